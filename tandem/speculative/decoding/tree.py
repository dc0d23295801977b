"""Tree drafting (EAGLE-2 style): the draft proposes a small tree of continuations, the target verifies them
all in one forward, and the longest branch that equals the target's greedy choices is kept.

A chain bets a round on the draft's first choice at every depth; a tree also offers its runners-up. Growth
follows EAGLE-2's dynamic tree: a node's score is the sum of the draft's log-probabilities along its branch;
each depth expands the ``top_k`` best nodes of the depth before into their ``top_k`` best children, and the
``size`` best nodes of all depths are verified (a child never scores above its parent, so they form a tree).
Verification order: index 0 is the root (the last committed token), then the chosen nodes by depth;
``parents[i]`` is the verification index of node i's parent (-1 for the root).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tandem.speculative.drafts.eagle3 import DraftKVCache, Eagle3DraftModel


@dataclass(frozen=True)
class TreeShape:
    """How big a draft tree grows."""

    depth: int = 3
    """Longest branch (draft tokens beyond the committed one); each depth is one draft forward."""
    top_k: int = 4
    """Nodes expanded at each depth, and children kept per expanded node."""
    size: int = 8
    """Draft nodes sent to the target (the verification forward has ``size + 1`` positions)."""

    def __post_init__(self):
        if self.depth < 1 or self.top_k < 1 or self.size < 1:
            raise ValueError(f"a draft tree needs depth, top_k and size >= 1, got depth={self.depth}, "
                             f"top_k={self.top_k}, size={self.size}")

    def __str__(self) -> str:
        """``"DEPTH,TOP_K,SIZE"``, as :meth:`parse` reads it."""
        return f"{self.depth},{self.top_k},{self.size}"

    @classmethod
    def parse(cls, text: str) -> "TreeShape":
        """``"DEPTH,TOP_K,SIZE"`` (for example ``"3,4,8"``), as the command line takes it."""
        try:
            depth, top_k, size = (int(part) for part in text.split(","))
        except ValueError:
            raise ValueError(f"a draft tree is DEPTH,TOP_K,SIZE (three integers, like 3,4,8), got {text!r}") from None
        return cls(depth, top_k, size)


def ancestor_mask(parents: list[int], device: torch.device | None = None) -> torch.Tensor:
    """``[n, n]`` bool for a tree given by ``parents`` (each an earlier index, -1 for the root): row i is True at
    i's ancestors and at i itself (what position i may attend to)."""
    n = len(parents)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i, parent in enumerate(parents):
        if parent >= 0:
            mask[i] = mask[parent]
        mask[i, i] = True
    return mask.to(device) if device is not None else mask


@dataclass
class DraftTree:
    """A drafted tree in verification order (see the module docstring): ``tokens`` target ids (the root first),
    ``parents`` verification indices (-1 for the root), ``depths`` (0 for the root)."""

    tokens: list[int]
    parents: list[int]
    depths: list[int]

    def __len__(self) -> int:
        return len(self.tokens)

    def ancestor_mask(self, device: torch.device | None = None) -> torch.Tensor:
        """``[n, n]`` bool: see :func:`ancestor_mask`."""
        return ancestor_mask(self.parents, device)

    def accept(self, greedy: list[int]) -> list[int]:
        """Verification indices of the accepted nodes (root excluded), following ``greedy`` (the target's next
        token after each of the ``n`` positions) from the root for as long as a child holds that token."""
        children: dict[int, dict[int, int]] = {}
        for i, parent in enumerate(self.parents):
            if parent >= 0:
                children.setdefault(parent, {}).setdefault(self.tokens[i], i)
        path, node = [], 0
        while (child := children.get(node, {}).get(greedy[node])) is not None:
            path.append(child)
            node = child
        return path


@dataclass
class TreeNode:
    """A node the growth offers: its target ``token``, its ``parent`` (an index into the node list, -1 for the
    root), its ``depth`` (1 for the root's children) and its ``score``, the summed draft log-probabilities
    along its branch."""

    token: int
    parent: int
    depth: int
    score: float


def draft_tree(draft: Eagle3DraftModel, new_tokens: torch.Tensor, new_aux: torch.Tensor, start: int,
               cache: DraftKVCache, root_token: int, shape: TreeShape) -> DraftTree:
    """Extend the draft cache with committed positions, then draft a tree rooted at ``root_token``.

    Arguments:
        new_tokens: ``[1, m]`` long, the committed tokens the draft has not read yet (token i+1 for aux i).
        new_aux: ``[1, m, 3Ht]`` target dtype, the target's aux hidden states at those positions.
        start: the draft position of ``new_tokens[:, 0]``.
        root_token: the last committed token (``new_tokens[0, -1]``), the tree's root.
    """
    positions = torch.arange(start, start + new_tokens.shape[1], device=new_tokens.device).unsqueeze(0)
    hidden = draft.step(new_tokens, draft.project_aux(new_aux), positions, kv_cache=cache)[:, -1:]
    committed = cache.length
    nodes = grow_tree(draft, hidden, cache, shape)
    cache.crop(committed)  # tree entries are speculative; the next round rebuilds from the target
    return select_tree(nodes, root_token, shape.size)


def grow_tree(draft: Eagle3DraftModel, hidden: torch.Tensor, cache: DraftKVCache, shape: TreeShape) -> list[TreeNode]:
    """Every node the growth offers, depth by depth (see the module docstring), from ``hidden [1, 1, H]``, the
    draft's output at the last committed position; the speculative entries stay in ``cache`` (crop them).

    The nodes of depths up to d are those a growth of depth d offers: a shallower tree is a prefix of the list."""
    device = hidden.device
    committed = cache.length
    nodes: list[TreeNode] = []
    # The nodes to expand next: their indices, and the draft hidden state each was predicted from.
    frontier, frontier_hidden = [-1], hidden
    fed: list[int] = []  # the node each speculative draft-cache entry holds, in cache order
    for depth in range(1, shape.depth + 1):
        if depth > 1:
            tokens = torch.tensor([[nodes[i].token for i in frontier]], device=device)
            position = torch.full_like(tokens, committed + depth - 2)
            fed.extend(frontier)
            mask = _draft_mask(nodes, fed, frontier, device)
            frontier_hidden = draft.step(tokens, frontier_hidden, position, kv_cache=cache, tree_mask=mask)
        log_probs = torch.log_softmax(draft.logits(frontier_hidden)[0].float(), dim=-1)  # [len(frontier), Vd]
        base = torch.tensor([nodes[i].score if i >= 0 else 0.0 for i in frontier]).unsqueeze(1)
        best, index = log_probs.topk(min(shape.top_k, log_probs.shape[-1]), dim=-1)
        scores = base + best.cpu()
        # One conversion to Python numbers per depth (indexing tensors element by element costs more).
        score_rows, target_rows = scores.tolist(), draft.draft_to_target(index).tolist()
        first_new = len(nodes)
        for parent, row_targets, row_scores in zip(frontier, target_rows, score_rows):
            nodes.extend(TreeNode(token, parent, depth, score) for token, score in zip(row_targets, row_scores))
        if depth == shape.depth:
            break
        # Expand the top_k best children of this depth next, each from its parent's output hidden state.
        chosen = scores.flatten().topk(min(shape.top_k, scores.numel())).indices.tolist()
        frontier = [first_new + c for c in chosen]
        frontier_hidden = frontier_hidden[:, [c // index.shape[1] for c in chosen]]
    return nodes


def _draft_mask(nodes: list[TreeNode], fed: list[int], frontier: list[int], device) -> torch.Tensor:
    """``[len(frontier), len(fed)]`` bool: frontier node q may attend to the speculative cache entry of node e
    when e is q or one of its ancestors."""
    mask = torch.zeros(len(frontier), len(fed), dtype=torch.bool)
    where = {node: column for column, node in enumerate(fed)}
    for row, node in enumerate(frontier):
        while node >= 0:
            if node in where:
                mask[row, where[node]] = True
            node = nodes[node].parent
    return mask.to(device)


def select_tree(nodes: list[TreeNode], root_token: int, size: int) -> DraftTree:
    """The ``size`` best-scored nodes (a node only with its parent), in verification order."""
    order = sorted(range(len(nodes)), key=lambda i: (-nodes[i].score, nodes[i].depth))
    kept: set[int] = set()
    for i in order:
        if len(kept) == size:
            break
        if nodes[i].parent < 0 or nodes[i].parent in kept:
            kept.add(i)
    chosen = sorted(kept, key=lambda i: (nodes[i].depth, -nodes[i].score))
    index = {node: position + 1 for position, node in enumerate(chosen)}
    return DraftTree(
        tokens=[root_token] + [nodes[i].token for i in chosen],
        parents=[-1] + [index.get(nodes[i].parent, 0) for i in chosen],
        depths=[0] + [nodes[i].depth for i in chosen],
    )
