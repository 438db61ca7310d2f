"""SQUID networks: patch layout, neighbour attention inputs, position codes, masked shortcut, gradients,
training progress and determinism."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from thrifty.methods.squid.config import LossConfig
from thrifty.methods.squid.losses import discriminator_loss, generator_loss
from thrifty.methods.squid.memory import MemoryQueue, update_queues
from thrifty.methods.squid.model import (
    Discriminator,
    InpaintBlock,
    NetSettings,
    PatchUNet,
    masked_shortcut,
    neighbour_reads,
    patchify,
    position_codes,
    unpatchify,
)

SMALL = dict(image_size=24, base_filters=4, num_slots=8, decoder_slots=8, num_heads=4)


def small(**kw) -> NetSettings:
    return NetSettings(**{**SMALL, **kw})


def test_patchify_is_row_major_and_inverted_by_unpatchify():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6)
    p = patchify(x, 3)
    assert p.shape == (18, 1, 2, 2)
    torch.testing.assert_close(p[1, 0], x[0, 0, 0:2, 2:4])  # patch 1 = top row, middle column
    torch.testing.assert_close(p[3, 0], x[0, 0, 2:4, 0:2])  # patch 3 = middle row, left column
    torch.testing.assert_close(p[9, 0], x[1, 0, 0:2, 0:2])  # second image starts at patch 9
    torch.testing.assert_close(unpatchify(p, 3), x)


def test_neighbour_reads_exclude_centre_and_see_zeros_beyond_border():
    b, n, d = 2, 3, 4
    reads = (torch.arange(b * n * n, dtype=torch.float32) + 1).view(b, n * n, 1).expand(b, n * n, d)
    nb = neighbour_reads(reads, n).view(b, n * n, 8, d)[..., 0]  # value = position id + 1 (+9 per image)
    # centre patch 4 sees all 8 others of its own image, never itself
    assert sorted(nb[0, 4].tolist()) == [1, 2, 3, 4, 6, 7, 8, 9]
    # corner patch 0: neighbours right (1), below (3), diagonal (4); five zero-padded slots
    assert sorted(nb[0, 0].tolist()) == [0, 0, 0, 0, 0, 2, 4, 5]
    assert (nb[1] == 0).sum() > 0 and nb[1][nb[1] > 0].min() >= 10  # image 2 never sees image 1
    for p in range(n * n):
        assert (p + 1) not in nb[0, p].tolist()


def test_position_codes_are_distinct_binary_with_floor_log2_plus_one_bits():
    for p in (4, 9, 16):
        c = position_codes(p)
        assert c.shape == (p, int(torch.log2(torch.tensor(float(p)))) + 1)
        assert set(c.unique().tolist()) <= {0.0, 1.0}
        assert len({tuple(row.tolist()) for row in c}) == p
    assert position_codes(9)[5].tolist() == [0, 1, 0, 1]


def test_masked_shortcut_only_in_training():
    torch.manual_seed(0)
    new, old = torch.ones(64, 3, 8, 8), torch.zeros(64, 3, 8, 8)
    torch.testing.assert_close(masked_shortcut(new, old, 0.95, training=False), new)
    mixed = masked_shortcut(new, old, 0.95, training=True)
    frac = mixed[:, 0].mean().item()
    assert 0.93 < frac < 0.97
    assert torch.equal(mixed[:, 0], mixed[:, 2])  # one mask per location, shared over channels
    torch.testing.assert_close(masked_shortcut(new, old, 1.0, training=True), new)


def test_eval_mode_turns_shortcuts_off_and_is_deterministic():
    torch.manual_seed(0)
    model = PatchUNet(small())
    x = torch.rand(2, 1, 24, 24)
    model.train()
    model(torch.rand(4, 1, 24, 24))  # move BN statistics away from their init
    model.eval()
    a, b = model(x)["recon"], model(x)["recon"]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    model.train()
    torch.manual_seed(1)
    c = model(x)["recon"]
    torch.manual_seed(2)
    d = model(x)["recon"]
    assert not torch.allclose(c, d)  # training: random shortcut masks (and batch statistics)


def test_inpaint_block_shapes_and_full_scale_dimensions():
    s = NetSettings(image_size=96, base_filters=32, num_slots=200, decoder_slots=200)
    block = InpaintBlock(s, channels=256, spatial=4)
    assert block.dim == 1024  # the card's D for the digit setting
    assert block.memory.memory.shape == (9, 200, 1024)
    x = torch.randn(2 * 9, 256, 4, 4)
    block.eval()
    assert block(x).shape == x.shape
    quick = PatchUNet(NetSettings())
    assert quick.inpaint.dim == 64  # the card's quick D
    assert {k: v.dim for k, v in quick.decoder_memory.items()} == {"1": 16 * 8 * 8, "2": 32 * 4 * 4}


def test_settings_validation():
    with pytest.raises(ValueError, match="divisible"):
        NetSettings(image_size=25).validate()
    with pytest.raises(ValueError, match="ops"):
        NetSettings(ops=["concat"]).validate()
    with pytest.raises(ValueError, match="decoder_memory"):
        NetSettings(decoder_memory=[0]).validate()


def _one_step_grads(arm_kw: dict) -> tuple[PatchUNet, Discriminator]:
    torch.manual_seed(0)
    model, disc = PatchUNet(small(**arm_kw)), Discriminator(image_size=24)
    x = torch.rand(4, 1, 24, 24)
    w = LossConfig()
    out = model(x)
    d_loss = discriminator_loss(disc(x), disc(out["recon"].detach()), w)
    d_grads = torch.autograd.grad(d_loss, list(disc.parameters()), allow_unused=True)
    assert all(g is not None and g.abs().sum() > 0 for g in d_grads), "every D parameter learns from the D loss"
    terms = generator_loss(out, x, disc(out["recon"]), w)
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(terms["loss"], list(params.values()), allow_unused=True)
    missing = [n for (n, _), g in zip(params.items(), grads) if g is None or g.abs().sum() == 0]
    assert not missing, f"parameters without gradient: {missing}"
    # the teacher decoder learns only from its own reconstruction + distillation, never the student's recon
    t_params = [p for n, p in params.items() if n.startswith("teacher")]
    if not t_params:
        return model, disc
    g_recon = torch.autograd.grad(F.mse_loss(out["recon"], x), t_params, allow_unused=True, retain_graph=True)
    assert all(g is None for g in g_recon)
    return model, disc


@pytest.mark.parametrize(
    "arm_kw",
    [
        {},
        {"queue": False},
        {"transformer": False},
        {"inpaint": False, "decoder_memory": [], "teacher": False},
        {"inpaint": False, "decoder_memory": [], "teacher": False, "num_patches": 1, "ops": ["none"] * 3},
        {
            "inpaint": False,
            "decoder_memory": [],
            "teacher": False,
            "num_patches": 1,
            "ops": ["none"] * 3,
            "bottleneck_memory": True,
        },
        {
            "inpaint": False,
            "decoder_memory": [],
            "teacher": False,
            "bottleneck_memory": True,
            "memae_scope": "location",
        },
    ],
    ids=["squid", "no_queue", "no_transformer", "ae_skip", "ae", "memae", "memae_location"],
)
def test_every_parameter_gets_a_gradient(arm_kw):
    _one_step_grads(arm_kw)


def test_teacher_sees_detached_un_inpainted_encoder():
    torch.manual_seed(0)
    model = PatchUNet(small())
    x = torch.rand(2, 1, 24, 24)
    out = model(x)
    student = [
        p for n, p in model.named_parameters() if n.startswith(("in_conv", "down", "inpaint", "decoder_memory", "up."))
    ]
    grads = torch.autograd.grad(F.mse_loss(out["teacher_recon"], x), student, allow_unused=True)
    assert all(g is None for g in grads)
    teacher = [p for n, p in model.named_parameters() if n.startswith("teacher")]
    grads = torch.autograd.grad(F.mse_loss(out["teacher_recon"], x), teacher, allow_unused=True)
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("combine", [0, 1, 2, 3])
def test_every_initial_combine_level_builds_and_reconstructs(combine):
    mem = [j for j in (1, 2) if j >= combine]
    model = PatchUNet(small(initial_combine=combine, decoder_memory=mem))
    model.eval()
    out = model(torch.rand(2, 1, 24, 24))
    assert out["recon"].shape == (2, 1, 24, 24)
    assert out["recon"].min() >= 0 and out["recon"].max() <= 1


def test_inpainting_reads_exactly_the_neighbours_memories():
    torch.manual_seed(0)
    s = small()
    block = InpaintBlock(s, channels=32, spatial=1)
    block.eval()
    x = torch.randn(9, 32, 1, 1)  # one image, 9 patches
    base = block(x).detach()
    with torch.no_grad():
        block.memory.memory[8] += torch.randn_like(block.memory.memory[8])  # the bottom-right position
    moved = (block(x).detach() - base).flatten(1).abs().amax(1)
    changed = {p for p in range(9) if moved[p] > 1e-6}
    assert changed == {4, 5, 7, 8}  # itself and the patches that have it as a grid neighbour


def _train(seed: int, steps: int) -> tuple[list[float], dict]:
    torch.manual_seed(seed)
    model, disc = PatchUNet(small()), Discriminator(image_size=24)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-4)
    yy, xx = torch.meshgrid(torch.arange(24.0), torch.arange(24.0), indexing="ij")
    centres = torch.tensor([[4.0, 4.0], [12.0, 12.0], [19.0, 6.0], [6.0, 18.0]])
    data = torch.stack([torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 8.0) for cy, cx in centres]).unsqueeze(1)
    w = LossConfig()
    losses = []
    for _ in range(steps):
        out = model(data)
        opt_d.zero_grad()
        discriminator_loss(disc(data), disc(out["recon"].detach()), w).backward()
        opt_d.step()
        terms = generator_loss(out, data, disc(out["recon"]), w)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        update_queues(model)
        losses.append(terms["recon"].item())
    return losses, copy.deepcopy(model.state_dict())


def test_loss_falls_and_seeded_runs_repeat_exactly():
    losses, state = _train(0, 25)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    losses2, state2 = _train(0, 25)
    assert losses == losses2
    for k in state:
        torch.testing.assert_close(state[k], state2[k], rtol=0, atol=0)


def test_queue_changes_only_after_update_in_a_training_step():
    torch.manual_seed(0)
    model = PatchUNet(small())
    q = next(m for m in model.modules() if isinstance(m, MemoryQueue))
    before = q.memory.clone()
    out = model(torch.rand(2, 1, 24, 24))
    out["recon"].mean().backward()
    torch.testing.assert_close(q.memory, before)
    update_queues(model)
    assert int(q.ptr) == 2 and not torch.allclose(q.memory, before)


def test_discriminator_output_shape_for_paper_and_quick_sizes():
    for size in (24, 48, 96):
        assert Discriminator(image_size=size)(torch.rand(3, 1, size, size)).shape == (3,)


def test_skip_free_ae_reconstruction_depends_only_on_the_bottleneck():
    """The authors' CAE has no skips: changing the encoder's intermediate maps (but not the bottleneck) cannot change
    the output, while SQUID's skip backbone passes them through."""
    torch.manual_seed(0)
    x = torch.rand(2, 1, 24, 24)
    for ops, same in ((["none"] * 3, True), (["concat", "concat", "none"], False)):
        model = PatchUNet(small(inpaint=False, decoder_memory=[], teacher=False, num_patches=1, ops=ops)).eval()
        z, skips = model.encode(x)
        recon, _ = model._decode(z, skips, model.up, model.out_conv, memories=False)
        noisy = [s + torch.randn_like(s) for s in skips]
        recon2, _ = model._decode(z, noisy, model.up, model.out_conv, memories=False)
        assert torch.equal(recon, recon2) == same


def test_memae_image_scope_reads_one_slot_vector_per_image():
    model = PatchUNet(
        small(inpaint=False, decoder_memory=[], teacher=False, num_patches=1, ops=["none"] * 3, bottleneck_memory=True)
    )
    c, side = model.s.filters()[3], 24 // 8
    assert model.bottleneck_memory.memory.memory.shape == (1, model.s.memae_slots, c * side * side)
    model(torch.rand(5, 1, 24, 24))
    w = model.bottleneck_memory.memory.last_weights
    assert w.shape == (5, 1, model.s.memae_slots)  # one read per image
    loc = PatchUNet(
        small(inpaint=False, decoder_memory=[], teacher=False, bottleneck_memory=True, memae_scope="location")
    )
    loc(torch.rand(5, 1, 24, 24))
    assert loc.bottleneck_memory.memory.last_weights.shape[0] == 5 * 9 * 1  # every location of every patch
