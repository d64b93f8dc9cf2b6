"""GRAIN with FSDP2: `torchrun --standalone --nproc_per_node=2 examples/fsdp_train.py`.

`fully_shard` splits every parameter on dim 0 over the ranks; GRAIN, built after it, leaves in each
rank's `.grad` that rank's shard of `d` (a DTensor, as FSDP's own backward would), and the optimizer
steps on the shards. Every rank's groups are global groups.
"""

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import torchgrain

dist.init_process_group("gloo")  # "nccl" on GPUs, with init_device_mesh("cuda", ...)
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)  # the same initial model on every rank
model = torch.nn.Sequential(
    torch.nn.Linear(10, 32), torch.nn.LayerNorm(32), torch.nn.ReLU(), torch.nn.Linear(32, 3)
)
mesh = init_device_mesh("cpu", (world,))
for layer in (model[0], model[3]):
    fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)  # the root last: its own parameters (the LayerNorm's)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
grain = torchgrain.GRAIN(model, num_groups=2)  # after fully_shard; the mesh's process group

g = torch.Generator().manual_seed(rank)  # each rank its own data
x, y = torch.randn(64, 10, generator=g), torch.randint(0, 3, (64,), generator=g)
for _ in range(10):
    optimizer.zero_grad()
    losses = torch.nn.functional.cross_entropy(model(x), y, reduction="none")  # (B,)
    stats = grain.backward(losses)  # 2 groups here x `world` ranks = global groups
    optimizer.step()
print(f"rank {rank}: loss {losses.mean().item():.4f}, {stats.num_groups} global groups")

weight = model[0].weight
print(f"rank {rank} holds rows {tuple(weight.grad.to_local().shape)} of {tuple(weight.shape)}")
dist.barrier()  # no rank tears Gloo down while another still talks to it
dist.destroy_process_group()
