"""What the patched model computes: FastV against eager attention weights, sdpa == eager selections,
token roles, the projector on kept tokens only, and the stats."""

from __future__ import annotations

import json

import pytest
import torch

import tokprune
from tokprune import TokenRole
from tokprune.adapters._seq import token_roles
from tokprune.testing.models import VOCAB, tiny_llava

LENGTHS = (5, 2, 8)


def _spy(pipeline: tokprune.Pipeline) -> dict[str, list]:
    """Record every (context, plan) each step decides, by wrapping the steps' ``plan`` on the instances."""
    seen: dict[str, list] = {}
    for step in pipeline:
        original = step.plan

        def plan(ctx, _original=original, _name=step.name):
            out = _original(ctx)
            seen.setdefault(_name, []).append((ctx, out))
            return out

        step.__dict__["plan"] = plan
    return seen


def _image_ranks_kept(ctx, keep: torch.Tensor) -> list[list[int]]:
    """Per sample, indices (among its image tokens, in order) of the kept image tokens."""
    image = ctx.role_mask(TokenRole.IMAGE)
    out = []
    for b in range(image.shape[0]):
        rank = image[b].long().cumsum(0) - 1
        out.append(sorted(rank[image[b] & keep[b]].tolist()))
    return out


@pytest.mark.parametrize("layer", [1, 2, 3])
def test_fastv_keeps_what_eager_attention_weights_say(layer):
    model, make_inputs = tiny_llava(seed=1, attn_implementation="eager")
    inputs = make_inputs(LENGTHS)
    keep = 20
    with torch.no_grad():
        attn = model(**inputs, output_attentions=True).attentions[layer - 1]  # [B, H, L, L], unpatched
    image = inputs["input_ids"] == VOCAB.image
    reference = []
    for b in range(image.shape[0]):
        row = attn[b, :, -1].float().mean(0)[image[b]]  # last token's row, head mean, image columns
        reference.append(sorted(row.topk(keep).indices.tolist()))
    pipeline = tokprune.strategies.get(f"fastv(layer={layer}, keep={keep})")
    seen = _spy(pipeline)
    with tokprune.pruned(model, pipeline), torch.no_grad():
        model(**inputs)
    ctx, plan = seen["fastv"][0]
    assert _image_ranks_kept(ctx, plan.keep) == reference


@pytest.mark.parametrize(
    "spec", ["fastv", "text_interact", "cls_knee+text_interact", "prumerge_plus", "topk(keep_ratio=0.3)"]
)
def test_sdpa_and_eager_select_the_same_tokens(spec):
    selections = {}
    for impl in ("sdpa", "eager"):
        model, make_inputs = tiny_llava(seed=0, attn_implementation=impl)
        pipeline = tokprune.strategies.get(spec)
        seen = _spy(pipeline)
        with tokprune.pruned(model, pipeline, question_end=VOCAB.assistant_marker), torch.no_grad():
            model(**make_inputs(LENGTHS))
        selections[impl] = {name: [plan.keep for _, plan in calls] for name, calls in seen.items()}
    for name, keeps in selections["sdpa"].items():
        for a, b in zip(keeps, selections["eager"][name]):
            assert torch.equal(a, b), name


def test_roles_follow_the_llava_layout():
    ids = torch.tensor(
        [
            [0, 0, 1, 4, 5, 3, 3, 3, 40, 41, 6, 5],  # padded; marker found
            [1, 4, 5, 3, 3, 3, 40, 41, 42, 43, 44, 6],  # marker cut off: question runs to the end
        ]
    )
    valid = ids != 0
    valid[1] = True
    roles, found = token_roles(ids, valid, VOCAB.image, VOCAB.assistant_marker)
    P, T, I, Q, X = (
        int(r)
        for r in (TokenRole.PADDING, TokenRole.TEMPLATE, TokenRole.IMAGE, TokenRole.QUESTION, TokenRole.PROTECTED)
    )
    assert roles[0].tolist() == [P, P, T, T, T, I, I, I, Q, Q, T, X]
    assert roles[1].tolist() == [T, T, T, I, I, I, Q, Q, Q, Q, Q, X]
    assert found.tolist() == [True, False]
    no_marker, _ = token_roles(ids, valid, VOCAB.image, None)
    assert no_marker[0, 10].item() == Q


def test_projector_runs_on_kept_tokens_only():
    model, make_inputs = tiny_llava(seed=0)
    rows = []
    handle = model.model.multi_modal_projector.register_forward_hook(lambda m, a, o: rows.append(a[0].shape))
    try:
        with tokprune.pruned(model, "topk(keep_ratio=0.25)") as run, torch.no_grad():
            model(**make_inputs(LENGTHS))
    finally:
        handle.remove()
    kept = int(run.stats.visual_kept.sum())
    assert kept == 3 * 16
    assert [tuple(s) for s in rows] == [(kept, model.config.vision_config.hidden_size)]


def test_stats_after_each_call():
    model, make_inputs = tiny_llava(seed=0)
    inputs = make_inputs(LENGTHS)
    n_layers = model.config.text_config.num_hidden_layers
    with tokprune.pruned(model, "topk(keep_ratio=0.25)+fastv(layer=2, keep=4)") as run, torch.no_grad():
        assert run.stats is None
        model.generate(**inputs, max_new_tokens=3, pad_token_id=VOCAB.pad)
        stats = run.stats
    seq_len = inputs["attention_mask"].sum(1)
    assert stats.visual_total == 64
    assert stats.seq_len.tolist() == seq_len.tolist()
    assert stats.visual_kept.tolist() == [16, 16, 16]
    after_vision = seq_len - 64 + 16
    assert stats.llm_kept[2].tolist() == (after_vision - 12).tolist()
    assert stats.layer_tokens.shape == (3, n_layers)
    assert stats.layer_tokens[:, 0].tolist() == after_vision.tolist()
    assert stats.layer_tokens[:, 3].tolist() == stats.llm_kept[2].tolist()
    assert stats.layer_visual[:, :2].eq(16).all() and stats.layer_visual[:, 2:].eq(4).all()
    assert torch.allclose(stats.visual_layer_avg, torch.tensor([10.0] * 3))
    assert torch.allclose(stats.tokens_layer_avg, stats.layer_tokens.float().mean(1))
    assert (stats.flops_pruned < stats.flops_unpruned).all()
    records = stats.to_records()
    assert len(records) == 3 and records[1]["llm_kept_2"] == int(stats.llm_kept[2][1])
    assert "fastv.keep_count" in records[0] and "topk.keep_count" in records[0]
    json.dumps(records)


def test_flops_match_the_formula_and_keep_all_costs_the_same():
    model, make_inputs = tiny_llava(seed=0)
    inputs = make_inputs((4,))
    cfg, vcfg = model.config.text_config, model.config.vision_config
    with tokprune.pruned(model, "none") as run, torch.no_grad():
        model(**inputs)
    n = int(inputs["attention_mask"].sum())
    d, m, c, mv = cfg.hidden_size, cfg.intermediate_size, vcfg.hidden_size, vcfg.intermediate_size
    kv = cfg.num_key_value_heads * (getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads)

    def llama_layer(n):  # q, o; k, v at the key-value width; attention; gate, up, down
        return 2 * n * d * d + 2 * n * d * kv + 2 * n * n * d + 3 * n * d * m

    def clip_layer(n):  # q, k, v, o; attention; fc1, fc2
        return 4 * n * c * c + 2 * n * n * c + 2 * n * c * mv

    expected = cfg.num_hidden_layers * llama_layer(n) + vcfg.num_hidden_layers * clip_layer(65) + 64 * (c * d + d * d)
    assert run.stats.flops_unpruned.tolist() == [expected]
    assert run.stats.flops_pruned.tolist() == [expected]
    assert run.stats.flops_fastv_ratio.tolist() == [1.0]


def test_flops_fastv_column_is_fastvs_llm_only_formula():
    model, make_inputs = tiny_llava(seed=0)
    inputs = make_inputs((4,))
    cfg = model.config.text_config
    d, m, n_layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    with tokprune.pruned(model, "fastv(layer=2, keep=16)") as run, torch.no_grad():
        model(**inputs)

    def fastv(n):
        return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m

    tokens = run.stats.layer_tokens[0].tolist()
    n = int(inputs["attention_mask"].sum())
    assert tokens[0] == n and tokens[-1] == n - 64 + 16
    expected = sum(fastv(t) for t in tokens) / (n_layers * fastv(n))
    assert run.stats.flops_fastv_ratio.tolist() == [pytest.approx(expected, rel=1e-12)]
    assert run.stats.to_records()[0]["flops_fastv_ratio"] == pytest.approx(expected, rel=1e-12)
    # The real (SwiGLU) count gives another ratio: the MLP weighs more.
    assert float(run.stats.flops_ratio[0]) != pytest.approx(expected, rel=1e-3)


def test_decoding_continues_at_the_unpruned_length():
    """Keep mode: the first generated token sits at position L (the unpruned prompt length) in every layer."""
    model, make_inputs = tiny_llava(seed=0)
    inputs = make_inputs((5,))
    positions = []
    layer = model.model.language_model.layers[3]
    hook = layer.register_forward_pre_hook(
        lambda m, a, kw: positions.append(kw["position_ids"].clone()), with_kwargs=True
    )
    try:
        with tokprune.pruned(model, "topk(keep_ratio=0.25)+fastv(layer=2, keep=4)"), torch.no_grad():
            model.generate(**inputs, max_new_tokens=2, pad_token_id=VOCAB.pad)
    finally:
        hook.remove()
    n = inputs["input_ids"].shape[1]
    prefill, decode = positions[0], positions[1]
    assert prefill.shape[1] == n - 64 + 16 - 12 and prefill[0, -1].item() == n - 1
    assert decode.tolist() == [[n]]


def _readme_run(model, processor, spec: str) -> tuple[torch.Tensor, list]:
    """The README's prompts (8 benchmark samples, ``build_prompt``) through ``spec``; (input_ids, text_interact calls)."""
    import tokprune.data

    samples = tokprune.data.benchmark("test", n=8)
    inputs = processor(
        images=[s.image for s in samples],
        text=[tokprune.data.build_prompt(s.question) for s in samples],
        return_tensors="pt",
        padding=True,
    )
    pipeline = tokprune.strategies.get(spec)
    seen = _spy(pipeline)
    with tokprune.pruned(model, pipeline), torch.no_grad():  # no question_end: roles from the model's template
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    return inputs["input_ids"], seen["text_interact"]


def test_assistant_marker_from_the_embedded_models_template_is_never_dropped():
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    import tokprune.models
    from tokprune.adapters.roles import template_marker

    path = tokprune.models.path("tiny-llava-shapes")
    processor = AutoProcessor.from_pretrained(path)
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    marker = template_marker(processor)
    assert marker == processor.tokenizer.encode("ASSISTANT:", add_special_tokens=False)  # read from the template
    ids, calls = _readme_run(model, processor, "text_interact")
    m = len(marker)
    assert (ids[:, -m:] == torch.tensor(marker)).all()  # every README prompt ends with the marker
    ctx, plan = calls[0]
    assert (ctx.roles[:, -m:-1] == TokenRole.TEMPLATE).all() and (ctx.roles[:, -1] == TokenRole.PROTECTED).all()
    assert plan.keep[:, -m:].all()
    # Without the template (a model with no saved tokenizer), the marker is question text and gets dropped:
    # that is what the template reading prevents.
    model.name_or_path = model.config._name_or_path = ""
    _, calls = _readme_run(model, processor, "text_interact")
    ctx, plan = calls[0]
    assert (ctx.roles[:, -m:-1] == TokenRole.QUESTION).all() and not plan.keep[:, -m:].all()


def test_assembly_places_images_of_different_sizes_and_their_extra_tokens():
    # The core's assembly with a ragged VisionOut (what AnyRes / dynamic-resolution families produce):
    # sample 0 has one image of 5 tokens, sample 1 two images of 3 and 4; rows are padded to 5.
    from tokprune.adapters.decoder import VisionOut

    model, _ = tiny_llava(seed=0)
    I = VOCAB.image
    ids = torch.tensor([[0, 0, 1, I, I, I, I, I, 9, 10], [1, I, I, I, 9, I, I, I, I, 10]])
    valid = ids != 0
    lengths = torch.tensor([5, 3, 4])
    keep = torch.tensor([[1, 0, 1, 1, 0], [0, 1, 1, 0, 0], [1, 0, 0, 1, 0]], dtype=torch.bool)
    d = model.config.text_config.hidden_size
    kept = torch.arange(int(keep.sum()), dtype=torch.float32)[:, None].expand(-1, d) + 100.0
    extra = -torch.arange(1, 4, dtype=torch.float32)[:, None, None].expand(-1, 1, d)  # one per image: -1, -2, -3
    features = VisionOut(kept=kept, keep=keep, extra=extra, lengths=lengths)
    with tokprune.pruned(model, "none") as run:
        embeds = torch.zeros(2, 10, d)
        pos = torch.arange(10)[None].expand(2, 10)
        roles = torch.zeros(2, 10, dtype=torch.long)
        seq, image_sample = run._vision_assembly(ids, embeds, valid, pos, roles, 10, features)
    assert image_sample.tolist() == [0, 1, 1]
    got = [seq.hidden[b, seq.valid[b], 0].tolist() for b in range(2)]
    # kept features in order, each image's extra token right after its block, text (zeros) elsewhere
    assert got[0] == [0, 100, 101, 102, -1, 0, 0]
    assert got[1] == [0, 103, 104, -2, 0, 105, 106, -3, 0]
    extra_pos = seq.pos[1, seq.valid[1]].tolist()
    assert extra_pos == [0, 2, 3, 3, 4, 5, 8, 8, 9]  # keep mode: an extra token takes its image's last position


def test_families_with_variable_image_sizes_refuse_fixed_size_vision_strategies(monkeypatch):
    from tokprune import Pipeline, PruningStrategy, Stage, VisionPlan
    from tokprune.adapters.llava import LlavaAdapter
    from tokprune.errors import MissingCapabilityError

    class FixedSize(PruningStrategy):  # assumes N tokens per image: no ragged_vision (as downsample)
        name = "fixed_size_probe"
        stage = Stage.VISION

        def plan(self, ctx):
            return VisionPlan(keep=torch.ones(ctx.features.shape[:2], dtype=torch.bool))

    model, _ = tiny_llava(seed=0)
    monkeypatch.setattr(LlavaAdapter, "variable_image_tokens", True)
    with pytest.raises(MissingCapabilityError, match=r"^fixed_size_probe cuts images of one fixed size.*per image: .*random.*topk"):
        tokprune.patch(model, Pipeline([FixedSize()]))
    tokprune.patch(model, "cls_knee").remove()  # the reference method cuts per image too
    tokprune.patch(model, "topk+fastv").remove()  # ragged-capable vision strategy, and any LLM strategy


def test_assembly_still_refuses_bad_input_after_its_single_check_read():
    # The input checks are read from the device in one go; each must still raise its own error.
    from tokprune.adapters.decoder import VisionOut
    from tokprune.errors import InputError

    model, _ = tiny_llava(seed=0)
    I = VOCAB.image
    ids = torch.tensor([[1, I, I, I, 9, 10]])
    d = model.config.text_config.hidden_size
    embeds, pos, roles = torch.zeros(1, 6, d), torch.arange(6)[None], torch.zeros(1, 6, dtype=torch.long)
    valid = torch.ones(1, 6, dtype=torch.bool)
    four = VisionOut.unpruned([torch.zeros(4, d)])
    with tokprune.pruned(model, "none") as run:
        with pytest.raises(ValueError, match="tokens: 3, features: 4"):
            run._vision_assembly(ids, embeds, valid, pos, roles, 6, four)
        with pytest.raises(ValueError, match="no pixel_values"):
            run._vision_assembly(ids, embeds, valid, pos, roles, 6, None)
        right_padded = torch.tensor([[1, 1, 1, 1, 1, 0]], dtype=torch.bool)
        for features in (four, None):  # the padding error comes first, with or without images
            with pytest.raises(InputError, match="right-padded"):
                run._vision_assembly(ids, embeds, right_padded, pos, roles, 6, features)


def test_left_pack_index_with_a_known_width_equals_the_read_one():
    from tokprune.adapters._seq import left_pack_index

    keep = torch.tensor([[1, 0, 1, 1], [0, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    index, valid = left_pack_index(keep)
    assert index.tolist() == [[0, 2, 3], [0, 0, 2], [0, 0, 0]]
    assert valid.tolist() == [[True] * 3, [False, False, True], [False] * 3]
    given = left_pack_index(keep, width=3)
    assert torch.equal(given[0], index) and torch.equal(given[1], valid)


def test_stats_come_to_the_host_in_their_shapes_and_dtypes():
    from tokprune.adapters.decoder import _to_host

    tensors = {"a": torch.arange(6).view(2, 3), ("b", 1): torch.tensor([1.5, 2.5]), "c": torch.zeros(0, dtype=torch.long)}
    out = _to_host(tensors)
    assert out.keys() == tensors.keys()
    for key, value in tensors.items():
        assert out[key].dtype == value.dtype and torch.equal(out[key], value)


def test_pre_encoded_features_rebuild_the_same_vision_out():
    # generate() passes the features back: the carried flat tensors must give what the per-image list gives.
    from tokprune.adapters.decoder import PrunedImageFeatures, VisionOut

    keep = torch.tensor([[1, 0, 1], [0, 1, 0]], dtype=torch.bool)
    out = VisionOut(kept=torch.arange(3.0)[:, None], keep=keep, extra=torch.tensor([[[7.0]], [[8.0]]]))
    carried = PrunedImageFeatures.of(out)
    assert [p.flatten().tolist() for p in carried.pooler_output] == [[0, 1, 7], [2, 8]]
    listed = PrunedImageFeatures(pooler_output=carried.pooler_output, keep=keep, num_extra=1)  # no flat tensors
    for rebuilt in (carried.vision_out(), listed.vision_out()):
        assert torch.equal(rebuilt.kept, out.kept) and torch.equal(rebuilt.extra, out.extra)


def test_packed_width_reads_the_width_and_whether_rows_are_full():
    from tokprune.adapters._seq import packed_width

    assert packed_width(torch.tensor([[1, 0, 1], [0, 1, 1]], dtype=torch.bool)) == (2, True)
    assert packed_width(torch.tensor([[1, 0, 1], [0, 0, 1]], dtype=torch.bool)) == (2, False)
    assert packed_width(torch.zeros(0, 3, dtype=torch.bool)) == (0, True)
