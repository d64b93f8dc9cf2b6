"""GRAIN on several processes: `torchrun --standalone --nproc_per_node=2 examples/ddp_train.py`.

Each rank trains on its own shard of the data; every rank's groups are global groups, and after
`grain.backward` every rank holds the same `.grad` (so no DDP wrapper is needed).
"""

import torch
import torch.distributed as dist

import torchgrain

dist.init_process_group("gloo")  # "nccl" on GPUs
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)  # the same initial model on every rank
model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
grain = torchgrain.GRAIN(model, num_groups=2, process_group=dist.group.WORLD)

g = torch.Generator().manual_seed(rank)  # each rank its own data
x, y = torch.randn(64, 10, generator=g), torch.randint(0, 3, (64,), generator=g)
for _ in range(10):
    optimizer.zero_grad()
    losses = torch.nn.functional.cross_entropy(model(x), y, reduction="none")  # (B,)
    stats = grain.backward(losses)  # 2 groups here x `world` ranks = global groups
    optimizer.step()
print(f"rank {rank}: loss {losses.mean().item():.4f}, {stats.num_groups} global groups")

flat = torch.cat([p.grad.flatten() for p in model.parameters()])
copies = [torch.empty_like(flat) for _ in range(world)]
dist.all_gather(copies, flat)
if rank == 0 and all(torch.equal(c, flat) for c in copies):
    print("every rank holds the same .grad")
dist.barrier()  # no rank tears Gloo down while another still talks to it
dist.destroy_process_group()
