"""Memory planning: what a training run of lorafit needs, counted before it runs (`lorafit estimate`)."""
