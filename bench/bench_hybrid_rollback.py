"""Rolling a hybrid target's recurrent state back after a verification: recorded states against re-running.

    .venv/bin/python -m bench.bench_hybrid_rollback                 # Qwen3-Next geometry, hidden 512, 8 layers
    .venv/bin/python -m bench.bench_hybrid_rollback --quick         # hidden 64, 4 layers, seconds

A verification of k+1 positions on a Qwen3-Next target (gated DeltaNet beside full attention) must leave the
linear-attention layers' states as they were after the accepted positions only. Two ways, each timed on the
same rounds (a verification, then the rollback of its rejected tail), interleaved, from a random model of the
given geometry:

- ``recorded``: transformers' hybrid cache records the state after each verified position and ``crop`` picks
  the kept one (what ``decoding/recurrent_state.py`` does);
- ``rerun``: snapshot the states before the verification, restore them after it, and run the accepted
  positions again (one more forward a round);

against ``verify only``, the verifications without any rollback (the limit). Both ways are checked to give the
same next-token logits as a decode of the kept positions alone.
"""

from __future__ import annotations

import torch

from bench import common

COLUMNS = (("way", "figure", "s"), ("ms a round", "ms", ".2f"), ("limit", "limit", "s"),
           ("limit ms", "limit_ms", ".2f"), ("ratio", "ratio", ".2f"))


def _target(hidden: int, layers: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    heads = max(hidden // 64, 4)
    config = AutoConfig.for_model(
        "qwen3_next", vocab_size=2048, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=2, head_dim=hidden // heads, linear_num_value_heads=heads,
        linear_num_key_heads=heads // 2, linear_key_head_dim=hidden // heads, linear_value_head_dim=hidden // heads,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=hidden // 2,
        shared_expert_intermediate_size=hidden // 2, full_attention_interval=4, max_position_embeddings=4096)
    return AutoModelForCausalLM.from_config(config).eval()


def _linear_layers(cache):
    from transformers.cache_utils import LinearAttentionCacheLayerMixin

    return [(i, layer) for i, layer in enumerate(cache.layers) if isinstance(layer, LinearAttentionCacheLayerMixin)]


def _rerun_round(model, cache, ids: torch.Tensor, accepted: int) -> None:
    """Snapshot, verify ``ids [1, n]``, restore, run the first ``accepted + 1`` positions again."""
    linear = _linear_layers(cache)
    saved = [(layer.conv_states[0].clone(), layer.recurrent_states[0].clone(), layer.cumulative_length_linear.clone())
             for _, layer in linear]
    model(input_ids=ids, past_key_values=cache, use_cache=True)
    for (_, layer), (conv, state, length) in zip(linear, saved):
        layer.conv_states[0].copy_(conv)
        layer.recurrent_states[0].copy_(state)
        layer.cumulative_length_linear.copy_(length)
    linear_ids = {i for i, _ in linear}
    for i, layer in enumerate(cache.layers):
        if i not in linear_ids:
            layer.crop(-ids.shape[1])
    model(input_ids=ids[:, : accepted + 1], past_key_values=cache, use_cache=True)


def _recorded_round(model, cache, ids: torch.Tensor, accepted: int) -> None:
    from tandem.speculative.decoding.recurrent_state import forget_history, rollback

    forget_history(cache)
    model(input_ids=ids, past_key_values=cache, use_cache=True)
    rollback(cache, ids.shape[1] - accepted - 1)


def _decode(model, way: str, prompt: torch.Tensor, rounds: list[tuple[torch.Tensor, int]]) -> float:
    """Seconds of the rounds after a prefill; returns the next-token logits in ``_decode.last``."""
    import time

    from transformers import DynamicCache

    from tandem.speculative.decoding.recurrent_state import new_decode_cache

    cache = new_decode_cache(model.config) if way == "recorded" else DynamicCache(config=model.config)
    model(input_ids=prompt, past_key_values=cache, use_cache=True)
    start = time.perf_counter()
    for ids, accepted in rounds:
        if way == "recorded":
            _recorded_round(model, cache, ids, accepted)
        elif way == "rerun":
            _rerun_round(model, cache, ids, accepted)
        else:
            model(input_ids=ids, past_key_values=cache, use_cache=True)
    spent = time.perf_counter() - start
    _decode.last = model(input_ids=torch.tensor([[7]]), past_key_values=cache, use_cache=True).logits[0, -1]
    return spent


def main(argv=None) -> None:
    p = common.parser(__doc__.splitlines()[0], runs=5)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--verify", type=int, default=5, help="positions a verification (1 + proposals)")
    p.add_argument("--rounds", type=int, default=24)
    args = common.settle(p.parse_args(argv))
    if args.quick:
        args.hidden, args.layers, args.rounds = 64, 4, 8
    model = _target(args.hidden, args.layers)
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 2000, (1, 96), generator=generator)
    rounds = [(torch.randint(3, 2000, (1, args.verify), generator=generator), i % (args.verify - 1))
              for i in range(args.rounds)]  # 0 .. k-1 proposals accepted: every round rolls something back
    with torch.no_grad():
        _decode(model, "recorded", prompt, rounds)
        recorded_logits = _decode.last
        _decode(model, "rerun", prompt, rounds)
        rerun_logits = _decode.last
        kept = torch.cat([prompt] + [ids[:, : a + 1] for ids, a in rounds], 1)
        want = model(input_ids=torch.cat([kept, torch.tensor([[7]])], 1)).logits[0, -1]
        error = max(float((recorded_logits - want).abs().max()), float((rerun_logits - want).abs().max()))
        assert error < 1e-3, f"a rollback left another state: logits off by {error}"
        times = common.interleaved({way: (lambda w=way: _decode(model, w, prompt, rounds))
                                    for way in ("verify only", "recorded", "rerun")}, args.runs, args.warmup)
    per_round = {k: [t / args.rounds for t in v] for k, v in times.items()}
    rows = []
    for way in ("recorded", "rerun"):
        row = common.ratio_row(way, per_round[way], "verify only", per_round["verify only"], 0)
        row.update(ms=row["median_s"] * 1e3, limit_ms=row["limit_median_s"] * 1e3)
        rows.append(row)
    table = common.format_table(rows, COLUMNS)
    note = (f"Qwen3-Next geometry, hidden {args.hidden}, {args.layers} layers, verifications of {args.verify} "
            f"positions, {args.rounds} rounds after a 96-token prefill; largest logit error {error:.1e}")
    common.publish("bench_hybrid_rollback", "hybrid rollback: recorded states vs re-running", rows, args, table,
                   notes=[note])


if __name__ == "__main__":
    main()
