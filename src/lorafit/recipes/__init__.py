"""The jobs the commands run, as named phases a reader can follow (torchtune calls these recipes): `lorafit
train`'s settings, where a run starts (a new folder or a resumed run), and the training job itself."""
