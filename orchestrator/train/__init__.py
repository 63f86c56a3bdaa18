"""Student training on Ray Train: the training loop each worker runs (`loop`), its launch as a
Ray Train job (`launch`), the shard-fed sample streams (`stream`) and the status board a streaming
run shares (`board`)."""
