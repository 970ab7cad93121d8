"""SafeCLIP's losses: their definitions on one process, and DDP parity with 2 gloo ranks.

The DDP test runs this file as a script in two processes (`python tests/test_loss.py RANK PORT OUT`);
each rank computes every loss configuration on its half of a fixed global batch, averages the
gradients of a small shared projection as DDP would, and saves the result for the test to compare
with one process on the whole batch.
"""
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from open_clip_safe.loss import (CrossAugClipLoss, InModalLoss, NearestNeighbourBank, SafeclipLosses, UnlearnSuspects,
                                 sorted_members)

GLOBAL_BATCH, INPUT_DIM, EMBED_DIM, BANK_SIZE, STEPS, WORLD = 8, 12, 6, 12, 3, 2
CONFIGS = [(kind, bank, local, with_grad)
           for kind, bank in (("inmodal", 0), ("inmodal", BANK_SIZE), ("clip", None), ("clip_plain", None))
           for local in (False, True) for with_grad in (False, True)]


def make_loss(kind, bank, local, with_grad, rank, world_size):
    args = dict(local_loss=local, gather_with_grad=with_grad, cache_labels=True, rank=rank, world_size=world_size)
    if kind == "inmodal":
        return InModalLoss(bank_size=bank, embed_dim=EMBED_DIM, **args)
    return CrossAugClipLoss(cross_aug=kind == "clip", **args)


def make_model():
    torch.manual_seed(0)
    return torch.nn.ModuleDict({"image": torch.nn.Linear(INPUT_DIM, EMBED_DIM),
                                "text": torch.nn.Linear(INPUT_DIM, EMBED_DIM)})


def global_inputs(step):
    """Two views of images and texts for the global batch of `step`."""
    generator = torch.Generator().manual_seed(100 + step)
    return torch.randn(4, GLOBAL_BATCH, INPUT_DIM, generator=generator)


def run_config(config, rank, world_size, reduce):
    """Losses (averaged over ranks by `reduce`) and DDP-averaged gradients of STEPS steps."""
    model = make_model()
    log_scale = torch.nn.Parameter(torch.tensor(2.0))
    loss_fn = make_loss(*config, rank=rank, world_size=world_size)
    shard = GLOBAL_BATCH // world_size
    losses, grads = [], []
    for step in range(STEPS):
        inputs = global_inputs(step)[:, rank * shard:(rank + 1) * shard]
        image_v1, image_v2 = (F.normalize(model["image"](x), dim=-1) for x in inputs[:2])
        text_v1, text_v2 = (F.normalize(model["text"](x), dim=-1) for x in inputs[2:])
        model.zero_grad()
        log_scale.grad = None
        (loss,) = loss_fn(image_v1, image_v2, text_v1, text_v2, log_scale.exp()).values()
        loss.backward()
        losses.append(reduce(loss.detach()))
        grads.append([reduce(p.grad) for p in [*model.parameters(), log_scale]])
    return {"losses": losses, "grads": grads, "state": {k: v.clone() for k, v in loss_fn.state_dict().items()}}


def rank_main(rank, port, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)

    def ddp_mean(tensor):
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor / WORLD

    torch.save({config: run_config(config, rank, WORLD, ddp_mean) for config in CONFIGS}, out)
    dist.destroy_process_group()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    ranks = [subprocess.Popen([sys.executable, __file__, str(rank), str(port), str(out / f"{rank}.pt")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(WORLD)]
    for process in ranks:
        output, _ = process.communicate(timeout=120)
        assert process.returncode == 0, output[-3000:]
    return [torch.load(out / f"{rank}.pt") for rank in range(WORLD)]


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_ddp_matches_one_process(ddp_results, config):
    kind, bank, local, with_grad = config
    single = run_config(config, rank=0, world_size=1, reduce=lambda t: t.clone())
    for result in ddp_results:
        ddp = result[config]
        # the loss averaged over ranks is the global batch's loss in every mode
        torch.testing.assert_close(torch.stack(ddp["losses"]), torch.stack(single["losses"]))
        for step in range(STEPS):
            *ddp_feature_grads, ddp_scale_grad = ddp["grads"][step]
            *feature_grads, scale_grad = single["grads"][step]
            if with_grad:
                for got, want in zip(ddp["grads"][step], single["grads"][step]):
                    torch.testing.assert_close(got, want)
            elif not local:
                # open_clip's convention: gradients flow through the local shard only (loss.py docstring)
                for got, want in zip(ddp_feature_grads, feature_grads):
                    torch.testing.assert_close(got * WORLD, want)
                torch.testing.assert_close(ddp_scale_grad, scale_grad)
        for name, value in single["state"].items():  # the memory banks fill identically
            torch.testing.assert_close(ddp["state"][name], value)


def features(batch=5, dim=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(batch, dim, generator=generator), dim=-1) for _ in range(4)]


def test_cross_aug_pairs_image_view1_with_caption_view2():
    image_v1, image_v2, text_v1, text_v2 = features()
    scale = torch.tensor(10.0)
    labels = torch.arange(5)
    want = (F.cross_entropy(scale * image_v1 @ text_v2.T, labels) + F.cross_entropy(scale * text_v1 @ image_v2.T, labels)) / 2
    got = CrossAugClipLoss()(image_v1, image_v2, text_v1, text_v2, scale)["contrastive_loss"]
    torch.testing.assert_close(got, want)


def test_without_cross_aug_it_is_open_clips_clip_loss():
    image_v1, image_v2, text_v1, text_v2 = features()
    loss = CrossAugClipLoss(cross_aug=False)
    assert not loss.needs_both_views
    got = loss(image_v1, image_v2, text_v1, text_v2, torch.tensor(10.0))["contrastive_loss"]
    torch.testing.assert_close(got, ClipLoss()(image_v1, text_v1, torch.tensor(10.0)))


def test_inmodal_loss_without_bank_contrasts_view2_with_view1():
    image_v1, image_v2, text_v1, text_v2 = features()
    scale, labels = torch.tensor(10.0), torch.arange(5)
    want = (F.cross_entropy(scale * image_v2 @ image_v1.T, labels) + F.cross_entropy(scale * text_v2 @ text_v1.T, labels)) / 2
    got = InModalLoss()(image_v1, image_v2, text_v1, text_v2, scale)["inmodal_loss"]
    torch.testing.assert_close(got, want)


def test_bank_returns_nearest_earlier_entry_then_enqueues_fifo():
    bank = NearestNeighbourBank(size=3, dim=2)
    torch.testing.assert_close(bank.bank.norm(dim=1), torch.ones(3))  # random unit vectors
    bank.enqueue(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    query = torch.tensor([[0.9, 0.1], [0.1, 0.9]], requires_grad=True)
    neighbours = bank.nearest(query)
    assert not neighbours.requires_grad
    torch.testing.assert_close(neighbours, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    bank.enqueue(torch.tensor([[0.0, -1.0], [0.6, 0.8]]))  # overwrites the two oldest: FIFO
    torch.testing.assert_close(bank.bank, torch.tensor([[0.0, -1.0], [0.6, 0.8], [-1.0, 0.0]]))
    assert int(bank.pointer) == 2


def test_inmodal_positive_is_neighbour_from_before_the_batch():
    image_v1, image_v2, text_v1, text_v2 = features(batch=4, dim=3)
    loss = InModalLoss(bank_size=4, embed_dim=3)
    before = loss.image_bank.bank.clone()
    scale, labels = torch.tensor(5.0), torch.arange(4)
    got = loss(image_v1, image_v2, text_v1, text_v2, scale)["inmodal_loss"]
    image_positive = before[(image_v1 @ before.T).argmax(1)]
    image_loss = F.cross_entropy(scale * image_v2 @ image_positive.T, labels)
    torch.testing.assert_close(loss.image_bank.bank, image_v1)  # the batch's view 1 now fills the bank
    text_bank = InModalLoss(bank_size=4, embed_dim=3).text_bank.bank
    text_loss = F.cross_entropy(scale * text_v2 @ text_bank[(text_v1 @ text_bank.T).argmax(1)].T, labels)
    torch.testing.assert_close(got, (image_loss + text_loss) / 2)


def test_losses_from_args_and_bank_state_round_trip():
    args = SimpleNamespace(local_loss=False, gather_with_grad=False, rank=0, world_size=1, horovod=False,
                           safeclip_memory_bank_size=16, safeclip_cross_aug=True, model="RN50")
    losses = SafeclipLosses(args)
    assert losses.inmodal.image_bank.bank.shape == (16, 1024)
    losses.inmodal(*features(batch=3, dim=1024), torch.tensor(1.0))
    restored = SafeclipLosses(args)
    restored.load_state_dict(losses.state_dict())
    torch.testing.assert_close(restored.inmodal.image_bank.bank, losses.inmodal.image_bank.bank)
    assert int(restored.inmodal.text_bank.pointer) == 3
    assert losses.clip.needs_both_views and losses.inmodal.needs_both_views
    no_bank = SafeclipLosses(SimpleNamespace(**{**vars(args), "safeclip_memory_bank_size": 0, "model": "unknown"}))
    assert no_bank.state_dict() == {}


def test_unlearning_pushes_only_the_suspects_images_off_their_own_captions():
    image_v2 = features(batch=4, dim=3)[1]
    image_v1 = torch.tensor([[1.0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 0, 0]])
    text_v1 = torch.tensor([[0.6, 0.8, 0], [0.6, 0.8, 0], [0, 0, 1], [-1, 0, 0]])  # cos 0.6, 0.6, 0, -1
    image_v1.requires_grad_(True), image_v2.requires_grad_(True), text_v1.requires_grad_(True)
    scale = torch.tensor(10.0, requires_grad=True)
    suspect = torch.tensor([True, False, True, True])
    loss = UnlearnSuspects()(image_v1, image_v2, text_v1, suspect, scale)["unlearn_loss"]
    push_v2 = F.relu(10 * (image_v2 * text_v1).sum(-1))[suspect].sum()
    torch.testing.assert_close(loss, (10 * 0.6 + push_v2) / 8)  # sample 2 orthogonal, 3 opposite: no push
    loss.backward()
    assert text_v1.grad is None and scale.grad is None, "the caption and the scale stay where they are"
    torch.testing.assert_close(image_v1.grad[0], 10 * text_v1[0].detach() / 8)  # gradient descent lowers the cosine
    assert not image_v1.grad[1:].any() and not image_v2.grad[1].any(), "no push on a clean sample or a cosine <= 0"


def test_unlearning_finds_its_suspects_by_id():
    suspects = UnlearnSuspects().for_suspects(torch.tensor([90, 7, 42]).numpy())
    image = F.normalize(torch.ones(4, 3), dim=-1)
    pushed = suspects(torch.tensor([42, 8, 90, 91]), image, image, image, torch.tensor(1.0))["unlearn_loss"]
    torch.testing.assert_close(pushed, torch.tensor(2 * 2 / 8))  # ids 42 and 90, cosine 1, both views
    assert sorted_members(torch.tensor([3, 5]).numpy(), torch.tensor([5, 4, 9, 3]).numpy()).tolist() == [True, False, False, True]
    assert sorted_members(torch.tensor([], dtype=torch.long).numpy(), torch.tensor([5]).numpy()).tolist() == [False]


if __name__ == "__main__":
    rank_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
