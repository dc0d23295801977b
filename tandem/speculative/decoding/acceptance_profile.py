"""How many tokens a round each candidate shape would get accepted, measured without verifying anything.

Speculative decoding outputs the target's greedy continuation, so once that continuation is known (one plain
decode of a prompt) what a round accepts depends on the draft alone: the draft reads the committed tokens and
the target's aux states of them (one target forward over prompt + continuation), proposes a chain or grows a
tree from the last committed token, and a round accepts the longest proposed branch that equals the
continuation. This module does that at every position of the continuation, for every chain length and every
tree (a tree of depth d is the first d depths of the deepest growth of its width; its size is a selection
from those nodes), then replays the decode round by round: the acceptance length of each shape on those
prompts, as ``speculative_decode`` would measure it, at the cost of draft forwards only.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from tandem.speculative.decoding.shape_choice import DecodingShape
from tandem.speculative.decoding.tree import TreeShape, grow_tree, select_tree
from tandem.speculative.drafts.eagle3 import DraftKVCache, Eagle3DraftModel


@dataclass
class Continuation:
    """A prompt and the target's greedy continuation of it.

    ids: ``[1, S + T]`` long, the ``prompt_length`` = S prompt tokens then the T continuation tokens.
    aux: ``[1, S + T, 3H]`` target dtype, the target's aux hidden states at those positions.
    """

    ids: torch.Tensor
    aux: torch.Tensor
    prompt_length: int


def _chain_hits(draft: Eagle3DraftModel, hidden: torch.Tensor, cache: DraftKVCache, expected: list[int],
                length: int) -> int:
    """Leading tokens of a greedy chain of ``length`` drafted from ``hidden [1, 1, H]`` that equal ``expected``."""
    committed = cache.length
    hits = 0
    for j in range(min(length, len(expected))):
        token = draft.draft_to_target(draft.logits(hidden)[0, -1].argmax())
        if int(token) != expected[j]:
            break
        hits += 1
        if j + 1 < length:
            hidden = draft.step(token.view(1, 1), hidden, torch.tensor([[committed + j]], device=hidden.device),
                                kv_cache=cache)
    cache.crop(committed)
    return hits


def _tree_hits(nodes, shapes: list[TreeShape], root_token: int, expected: list[int]) -> dict[TreeShape, int]:
    """Tokens each tree of ``shapes`` (all of the width ``nodes`` grew with) accepts along ``expected``."""
    hits = {}
    for shape in shapes:
        grown = [n for n in nodes if n.depth <= shape.depth]  # nodes come depth by depth: a prefix
        tree = select_tree(grown, root_token, shape.size)
        # The target's greedy token after every node of the right branch; nodes off it are never asked.
        greedy = [expected[d] if d < len(expected) else -1 for d in tree.depths]
        hits[shape] = len(tree.accept(greedy))
    return hits


@torch.no_grad()
def accepted_per_position(draft: Eagle3DraftModel, sequence: Continuation,
                          shapes: list[DecodingShape]) -> dict[DecodingShape, list[int]]:
    """``{shape: accepted}``: for each root position r = S .. S+T-2 (the last committed token), the draft tokens a
    round starting there accepts (the bonus token not counted), each shape drafted from the same draft state."""
    ids, aux, start = sequence.ids.to(draft.fc.weight.device), sequence.aux, sequence.prompt_length
    tokens = ids[0].tolist()
    chains = sorted({s.draft_tokens for s in shapes if s.kind == "chain"})
    trees: dict[int, list[TreeShape]] = defaultdict(list)
    for s in shapes:
        if s.kind == "tree":
            trees[s.tree.top_k].append(s.tree)
    cache = DraftKVCache()
    positions = torch.arange(start, device=ids.device).unsqueeze(0)
    hidden = draft.step(ids[:, 1:start + 1], draft.project_aux(aux[:, :start].to(ids.device)), positions,
                        kv_cache=cache)[:, -1:]
    accepted: dict[DecodingShape, list[int]] = {s: [] for s in shapes}
    for root in range(start, len(tokens) - 1):
        expected = tokens[root + 1:root + 1 + 8]  # no shape accepts more than its depth
        for length in chains:
            accepted[DecodingShape.chain(length)].append(_chain_hits(draft, hidden, cache, expected, length))
        for top_k, of_width in trees.items():
            deepest = TreeShape(max(t.depth for t in of_width), top_k, 1)
            nodes = grow_tree(draft, hidden, cache, deepest)
            cache.crop(root)
            for tree, hits in _tree_hits(nodes, of_width, tokens[root], expected).items():
                accepted[DecodingShape.of_tree(tree)].append(hits)
        # Commit the root's successor: draft position ``root`` reads token root + 1 and aux ``root``.
        step_aux = draft.project_aux(aux[:, root:root + 1].to(ids.device))
        hidden = draft.step(ids[:, root + 1:root + 2], step_aux, torch.tensor([[root]], device=ids.device),
                            kv_cache=cache)
    return accepted


def replay_rounds(accepted: list[int]) -> int:
    """Rounds a decode takes when a round starting at root offset i accepts ``accepted[i]`` tokens (and adds the
    target's bonus token), until every one of the ``len(accepted) + 1`` continuation tokens after the first is
    produced."""
    position, rounds = 0, 0
    while position < len(accepted):
        position += accepted[position] + 1
        rounds += 1
    return rounds


def acceptance_lengths(draft: Eagle3DraftModel, sequences: list[Continuation],
                       shapes: list[DecodingShape]) -> dict[DecodingShape, float]:
    """``{shape: acceptance length}``: new tokens after the prefill's per verifying round, summed over
    ``sequences`` the way ``evaluation.summarize`` sums real decodes."""
    new_tokens = sum(s.ids.shape[1] - s.prompt_length - 1 for s in sequences)
    rounds: dict[DecodingShape, int] = defaultdict(int)
    for sequence in sequences:
        for shape, accepted in accepted_per_position(draft, sequence, shapes).items():
            rounds[shape] += replay_rounds(accepted)
    return {shape: new_tokens / max(rounds[shape], 1) for shape in shapes}
