"""The memory ledger's arithmetic: KV bytes per token from a config, the batch cache's rectangular layout,
reservations and what they leave free."""

from __future__ import annotations

from mlx_backend.engine.residency.memory import (
    KV_STEP_TOKENS,
    MemoryLedger,
    batch_kv_bytes,
    kv_bytes_per_token,
    rounded_tokens,
)

LLAMA_1B = {"num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 2048,
            "torch_dtype": "bfloat16"}


class Prefix:
    """A prefix cache holding `nbytes`, giving back what it is asked for."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.dropped: list[str] = []

    def trim(self, n_bytes: int) -> None:
        self.nbytes = max(0, self.nbytes - n_bytes)

    def drop(self, model_id: str) -> None:
        self.dropped.append(model_id)


def test_kv_bytes_per_token_is_keys_and_values_of_every_layer() -> None:
    # 2 (k, v) x 16 layers x 8 KV heads x 64 head dim x 2 bytes
    assert kv_bytes_per_token(LLAMA_1B) == 2 * 16 * 8 * 64 * 2 == 32768


def test_head_dim_and_dtype_and_missing_kv_heads() -> None:
    assert kv_bytes_per_token({**LLAMA_1B, "head_dim": 128}) == 2 * 16 * 8 * 128 * 2
    assert kv_bytes_per_token({**LLAMA_1B, "torch_dtype": "float32"}) == 2 * 16 * 8 * 64 * 4
    # float16 weights held as float32 (the CPU) compute, and cache, in float32; bfloat16 stays
    assert kv_bytes_per_token({**LLAMA_1B, "torch_dtype": "float16"}, float16_upcast=True) == 2 * 16 * 8 * 64 * 4
    assert kv_bytes_per_token(LLAMA_1B, float16_upcast=True) == 2 * 16 * 8 * 64 * 2
    no_gqa = {k: v for k, v in LLAMA_1B.items() if k != "num_key_value_heads"}
    assert kv_bytes_per_token(no_gqa) == 2 * 16 * 32 * 64 * 2  # every head keeps its own keys and values


def test_multimodal_configs_nest_the_text_model() -> None:
    assert kv_bytes_per_token({"model_type": "gemma3", "text_config": LLAMA_1B}) == 32768


def test_a_config_that_does_not_say_gives_zero() -> None:
    assert kv_bytes_per_token({"model_type": "mamba", "hidden_size": 768}) == 0
    assert kv_bytes_per_token({"num_hidden_layers": True, "num_attention_heads": 4, "hidden_size": 64}) == 0


def test_the_batch_cache_is_rows_times_the_longest_row_in_whole_steps() -> None:
    assert rounded_tokens(1) == rounded_tokens(KV_STEP_TOKENS) == KV_STEP_TOKENS
    assert rounded_tokens(KV_STEP_TOKENS + 1) == 2 * KV_STEP_TOKENS
    assert batch_kv_bytes([], 10) == 0
    assert batch_kv_bytes([100], 10) == 256 * 10
    # one long row makes every row long: 3 rows x 1024 tokens, not 1024 + 2 x 256
    assert batch_kv_bytes([1000, 10, 10], 10) == 3 * 1024 * 10


def test_reservations_and_what_they_leave_free() -> None:
    prefix = Prefix(500_000)
    ledger = MemoryLedger(budget=10_000_000, prefix=prefix)
    ledger.add_model("m", 4_000_000, per_token=1000)
    assert ledger.free == 5_500_000
    assert ledger.kv_increase("m", 300) == 512 * 1000
    ledger.reserve("a", "m", 300)
    assert ledger.kv_bytes("m") == ledger.kv_bytes() == 512_000
    # a longer row grows the rows already there too
    assert ledger.kv_increase("m", 600) == 2 * 768 * 1000 - 512_000
    ledger.reserve("b", "m", 600, rows=2)  # n = 2: two rows of its length
    assert ledger.rows("m") == 3
    assert ledger.kv_bytes() == 3 * 768 * 1000
    ledger.release("b")
    ledger.release("b")  # twice: nothing more happens
    assert ledger.kv_bytes() == 512_000
    ledger.release("a")
    assert ledger.kv_bytes() == 0 and ledger.free == 5_500_000


def test_alone_bytes_is_the_weights_and_its_own_rows() -> None:
    ledger = MemoryLedger(budget=1)
    ledger.add_model("m", 4000, per_token=2)
    assert ledger.alone_bytes("m", 10) == 4000 + 256 * 2
    assert ledger.alone_bytes("m", 10, rows=3) == 4000 + 3 * 256 * 2
    ledger.remove_model("m")
    assert ledger.weights_bytes == 0 and ledger.per_token("m") == 0


def test_the_ledger_owns_the_prefix_cache_s_bytes_and_trims_it_itself() -> None:
    prefix = Prefix(300)
    ledger = MemoryLedger(budget=1000, prefix=prefix)
    ledger.add_model("m", 800, per_token=0)
    assert ledger.prefix_bytes == 300 and ledger.free == -100  # read from the cache, never copied in
    ledger.trim_prefix(-ledger.free)
    assert prefix.nbytes == 200 and ledger.free == 0
    ledger.drop_prefix("m")
    assert prefix.dropped == ["m"]


def test_without_a_prefix_cache_it_holds_nothing() -> None:
    ledger = MemoryLedger(budget=1000)
    ledger.trim_prefix(500)
    assert ledger.prefix_bytes == 0 and ledger.free == 1000
