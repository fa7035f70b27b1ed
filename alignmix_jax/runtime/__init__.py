"""What a job needs from the machine and the file system, for training and evaluation alike:
devices and sharding, checkpoints, the workdir's lock and remembered config, output folders,
the metric log, preemption signals, XLA's CPU flags and the command-line entry points."""
