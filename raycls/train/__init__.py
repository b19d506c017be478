"""Fine-tuning a classifier head on Ray Train, from gold labels or from an LLM's own labels.

`spec` (the train spec), `data` (rows read with Ray Data, cleaned, counted, split),
`loop` (the TorchTrainer train function), `export` (the final Hugging Face model
directory and `train_metrics.json`), and `run` (what `raycls train --config ...` and `jobs/train.py` call).
The trained directory is what the `classifier` backend (`raycls.backends.classifier`)
labels a lake with.
"""
