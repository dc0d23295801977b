"""`Config`: DeepEP's performance-tuning knobs and the buffer sizes they imply.

The portable backend moves tokens with `all_to_all_single`, so it needs no pre-registered NVLink or RDMA
buffer; the size hints are still computed exactly as DeepEP computes them, because callers size
`num_nvl_bytes` / `num_rdma_bytes` from them and must get the same numbers when the native kernels serve.
"""

from __future__ import annotations

from dataclasses import dataclass

# DeepEP's compile-time constants that enter the size formulas.
NUM_MAX_NVL_PEERS = 8
NUM_BUFFER_ALIGNMENT_BYTES = 128
_MAX_TOPK = 128
_MAX_SCALES = 128
_INT_BYTES = 4
_TOPK_IDX_BYTES = 8  # topk_idx is int64
_FLOAT_BYTES = 4
_INT4_BYTES = 16
_SOURCE_META_BYTES = 8  # internode SourceMeta: two ints
_BF16_BYTES = 2


def _align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


@dataclass
class Config:
    """DeepEP's `Config(num_sms, nvl_send, nvl_recv, rdma_send, rdma_recv)`, positional like the original.

    The chunk sizes tune DeepEP's ring buffers; the portable backend uses only `num_sms`, whose half is the
    number of channels reported in the dispatch handle's channel prefix matrices.
    """

    num_sms: int
    """SMs given to the high-throughput kernels; channels = num_sms // 2."""
    num_max_nvl_chunked_send_tokens: int
    """Tokens a sender pushes to an NVLink peer per chunk."""
    num_max_nvl_chunked_recv_tokens: int
    """Capacity, in tokens, of each NVLink receive ring."""
    num_max_rdma_chunked_send_tokens: int
    """Tokens a sender pushes over RDMA per chunk."""
    num_max_rdma_chunked_recv_tokens: int
    """Capacity, in tokens, of each RDMA receive ring (aligned up to the send chunk)."""

    def __post_init__(self) -> None:
        # The same invariants DeepEP asserts in its C++ constructor, as readable errors.
        if self.num_sms < 0:
            raise ValueError(f"Config: num_sms must be >= 0, got {self.num_sms}")
        if self.num_max_nvl_chunked_send_tokens <= 0 or self.num_max_nvl_chunked_recv_tokens <= 0:
            raise ValueError("Config: NVLink chunk sizes must be positive")
        if self.num_max_nvl_chunked_send_tokens >= self.num_max_nvl_chunked_recv_tokens:
            raise ValueError("Config: num_max_nvl_chunked_send_tokens must be < num_max_nvl_chunked_recv_tokens")
        if self.num_max_rdma_chunked_send_tokens <= 0 or self.num_max_rdma_chunked_recv_tokens <= 0:
            raise ValueError("Config: RDMA chunk sizes must be positive")
        self.num_max_rdma_chunked_recv_tokens = _align_up(
            self.num_max_rdma_chunked_recv_tokens, self.num_max_rdma_chunked_send_tokens
        )
        # DeepEP's lazy RDMA head update needs the sender to always find room for one more chunk.
        if self.num_max_rdma_chunked_send_tokens > self.num_max_rdma_chunked_recv_tokens // 2:
            raise ValueError("Config: num_max_rdma_chunked_send_tokens must be <= half the RDMA receive tokens")

    @property
    def num_channels(self) -> int:
        return max(self.num_sms // 2, 1)

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """
        The NVLink buffer size DeepEP needs for tokens of `hidden_bytes` bytes across `num_ranks` ranks.

        Arguments:
            hidden_bytes: bytes of one token's hidden vector (e.g. `hidden * 2` for bf16).
            num_ranks: the number of ranks in the group.

        Returns:
            size: bytes, a multiple of 128.
        """
        if not (num_ranks < NUM_MAX_NVL_PEERS or num_ranks % NUM_MAX_NVL_PEERS == 0):
            raise ValueError(f"num_ranks={num_ranks} must be < {NUM_MAX_NVL_PEERS} or a multiple of it")
        num_rdma_ranks = max(num_ranks // NUM_MAX_NVL_PEERS, 1)
        num_nvl_ranks = min(num_ranks, NUM_MAX_NVL_PEERS)
        slots = (self.num_sms // 2) * num_nvl_ranks
        ring = slots * self.num_max_nvl_chunked_recv_tokens
        num_bytes = slots * (2 * num_rdma_ranks + 3) * _INT_BYTES
        num_bytes += ring * hidden_bytes
        num_bytes += ring * _SOURCE_META_BYTES
        num_bytes += ring * _MAX_TOPK * _TOPK_IDX_BYTES
        num_bytes += ring * _MAX_TOPK * _FLOAT_BYTES
        num_bytes += ring * _MAX_SCALES * _FLOAT_BYTES
        return _align_up(num_bytes, NUM_BUFFER_ALIGNMENT_BYTES)

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """
        The RDMA buffer size DeepEP needs for internode dispatch/combine; 0 within one node.

        Arguments:
            hidden_bytes: bytes of one token's hidden vector.
            num_ranks: the number of ranks in the group.

        Returns:
            size: bytes, a multiple of 128 (0 when `num_ranks <= 8`).
        """
        if num_ranks <= NUM_MAX_NVL_PEERS:
            return 0
        if num_ranks % NUM_MAX_NVL_PEERS != 0:
            raise ValueError(f"num_ranks={num_ranks} must be a multiple of {NUM_MAX_NVL_PEERS} across nodes")
        num_rdma_ranks = num_ranks // NUM_MAX_NVL_PEERS
        slots = (self.num_sms // 2) * num_rdma_ranks
        ring = slots * self.num_max_rdma_chunked_recv_tokens
        # Every region is doubled: one copy to send from, one to receive into.
        num_bytes = slots * (NUM_MAX_NVL_PEERS * 2 + 2) * 2 * _INT_BYTES
        num_bytes += ring * hidden_bytes * 2
        num_bytes += ring * _SOURCE_META_BYTES * 2
        num_bytes += ring * _MAX_TOPK * _TOPK_IDX_BYTES * 2
        num_bytes += ring * _MAX_TOPK * _FLOAT_BYTES * 2
        num_bytes += ring * _MAX_SCALES * _FLOAT_BYTES * 2
        num_bytes += ring * _INT4_BYTES * 2
        return _align_up(num_bytes, NUM_BUFFER_ALIGNMENT_BYTES)


def get_low_latency_rdma_size_hint(
    num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int
) -> int:
    """
    DeepEP's minimum RDMA buffer size for the low-latency kernels (two alternating buffers, bf16 sizing).

    Arguments:
        num_max_dispatch_tokens_per_rank: the most tokens any rank dispatches in one call.
        hidden: the hidden dimension of each token.
        num_ranks: the number of ranks in the group.
        num_experts: the number of experts across all ranks.

    Returns:
        size: bytes.
    """
    del num_ranks  # DeepEP's formula depends on the expert count only.
    num_scales = hidden // 128
    # One int4 header per message, then the larger of the bf16 and the FP8-plus-scales payloads.
    dispatch_msg = _INT4_BYTES + max(hidden * _BF16_BYTES, hidden + num_scales * _FLOAT_BYTES)
    # Combine messages carry bf16 data plus a (min, max) bf16 pair per 128 channels for LogFMT.
    combine_msg = num_scales * 2 * _BF16_BYTES + hidden * _BF16_BYTES
    m = num_max_dispatch_tokens_per_rank
    send_bytes = max(m * dispatch_msg, num_experts * m * combine_msg)
    recv_bytes = max(num_experts * m * dispatch_msg, num_experts * m * combine_msg)
    signal_bytes = _align_up(num_experts * _INT_BYTES, 128)
    total = 2 * (send_bytes + recv_bytes + signal_bytes)
    return (total + NUM_BUFFER_ALIGNMENT_BYTES) // NUM_BUFFER_ALIGNMENT_BYTES * NUM_BUFFER_ALIGNMENT_BYTES
