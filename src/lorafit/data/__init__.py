"""Instruction data: where it is and how it is read (`sources`: files, folders, globs, datasets folders; `tables`
and `json_records` the readers; `columns` the --columns mapping), records of every shape as conversations
(`records`), conversations as token ids (`encoding`, `tokenizing`), all records prepared and cached
(`prepared`, `prepared_store`), and the built-in date task (`tasks`)."""
