"""Tensor parallelism: process groups (parallel_state), model sharding (tensor_parallel) and the executors that start
one worker per device (mp_executor, ray_executor)."""
