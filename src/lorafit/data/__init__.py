"""Instruction data: records of every shape read from files (`records`), conversations tokenised into training
sequences (`tokenizing`), and the built-in date task (`tasks`)."""
