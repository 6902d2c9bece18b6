"""Tensor parallelism: one model over N GPUs, Meta's model-parallel layout, on NCCL.

    slicing.py   which slice of every weight rank r of N holds (Meta's ColumnParallel,
                 RowParallel, ParallelEmbedding), for every storage format
    model.py     ShardedTransformer: one rank's part of the model, two all-reduces per layer
    comm.py      the collectives: SimulatedWorld (ranks as threads, CPU tests), NcclComm
                 (CuPy's NCCL); the TCP rendezvous (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE)
    fused.py     ShardedFusedDecoder: cuda/fused.py's one-token CUDA graph with the collectives
    loading.py   a rank's model from a checkpoint: Meta's shard k read on rank k, other files
                 sliced as they are read; the memory plan per GPU
    workers.py   the processes: the parent is rank 0 (GPU 0) and starts a worker for every
                 other rank, hands each step to them and runs its own, waiting for its GPU by
                 polling; a worker that fails ends it all, cleanly

docs/parallel.md tells the story with the shapes on each rank.
"""
