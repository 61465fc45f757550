"""What every process of grpolab runs on: the device and its dtype, the process group and ranks, child
processes bound to their parent, atomic files, a stage's output relayed to its log, named failures, the
ordered re-sending outbox the tracker sends through. No ML here, and nothing from the layers above."""
