"""epmoe.comm: the communication leaf of expert parallelism.

Process groups and their layout (`parallel_dims`, `process`), communicators over torch.distributed
or mpi4py (`communicator`), collectives as small autograd Functions (`collectives`), exchange
timing (`timing`), and the dispatchers that exchange tokens (`dispatch`: all-to-all, `pipelined`)
with their slot maps (`slot_map`). Installed as `epmoe.comm` (setup.py's package_dir), never as a
top-level `comm`. It uses the model's pure index math and takes plain tensors; the single-device
dispatcher lives in `epmoe.model.dispatch`.
"""
