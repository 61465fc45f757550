"""The trainer's machinery, beside the loop of `stages/train.py` that reads as the algorithm: the DeepSpeed
engine (`engine`), a step's batch and its update (`update`), the loss weights of the variants (`loss_weights`),
TracIn's selection (`tracin`), what a step records (`recorder`) and the training checkpoints (`checkpoints`)."""
