"""Local SGD with GRAIN's outer step: `torchrun --standalone --nproc_per_node=2
examples/local_sgd_train.py`.

Each rank takes 8 inner AdamW steps on its own, skewed data, then the ranks' pseudo-gradients
(anchor - parameters) are combined by UPGrad instead of averaged, and an outer SGD with Nesterov
momentum steps on the combination (DiLoCo's outer optimizer). After each sync every rank holds the
same parameters.
"""

import torch
import torch.distributed as dist

import torchgrain

dist.init_process_group("gloo")  # "nccl" on GPUs
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(rank)  # LocalSGD starts every rank from rank 0's parameters
model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
outer = torch.optim.SGD(model.parameters(), lr=0.7, momentum=0.9, nesterov=True)
local = torchgrain.LocalSGD(model, sync_every=8, aggregator="upgrad", outer_optimizer=outer)

g = torch.Generator().manual_seed(rank)  # each rank its own data, mostly of one class
x = torch.randn(64, 10, generator=g) + rank
y = torch.where(
    torch.rand(64, generator=g) < 0.8, rank % 3, torch.randint(0, 3, (64,), generator=g)
)
for _ in range(32):
    inner.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    inner.step()
    stats = local.step()  # None between syncs
    if stats is not None and rank == 0:
        print(
            f"sync {stats.sync}: weights {[round(w, 3) for w in stats.weights.tolist()]}, "
            f"mean delta conflicts with a rank: {bool(stats.mean_conflict)}"
        )
print(f"rank {rank}: loss {loss.item():.4f}")

flat = torch.cat([p.detach().flatten() for p in model.parameters()])
copies = [torch.empty_like(flat) for _ in range(world)]
dist.all_gather(copies, flat)
if rank == 0 and all(torch.equal(c, flat) for c in copies):
    print("every rank holds the same parameters")
dist.barrier()  # no rank tears Gloo down while another still talks to it
dist.destroy_process_group()
