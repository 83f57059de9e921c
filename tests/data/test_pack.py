from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tuneloop.data.collate import collate_packed, collate_padded
from tuneloop.data.pack import pack, packing_efficiency
from tuneloop.data.render import IGNORE_INDEX


def rows(*lengths: int) -> list[tuple[list[int], list[int]]]:
    out = []
    for index, length in enumerate(lengths):
        ids = [10 + index * 7 + k for k in range(length)]
        out.append((ids, [IGNORE_INDEX] * (length // 2) + ids[length // 2 :]))
    return out


def test_best_fit_decreasing_keeps_every_row_with_its_own_positions_and_labels() -> None:
    data = rows(6, 3, 5, 2, 4, 1)
    packed = pack(data, max_len=8)
    assert all(len(sample) <= 8 for sample in packed)
    assert sum(len(s.seq_lengths) for s in packed) == len(data)
    assert len(packed) == 3  # 21 tokens in 8-token bins: 3 is optimal
    recovered = []
    for sample in packed:
        offset = 0
        assert len(sample.position_ids) == len(sample.input_ids) == len(sample.labels)
        for length in sample.seq_lengths:
            ids = sample.input_ids[offset : offset + length]
            assert sample.position_ids[offset : offset + length] == list(range(length))
            original = next((r for r in data if r[0] == ids), None)
            assert original is not None
            # the row's own labels, except its first token, which must not be learnt from the previous row
            assert sample.labels[offset] == IGNORE_INDEX
            assert sample.labels[offset + 1 : offset + length] == original[1][1:]
            recovered.append(ids)
            offset += length
    assert sorted(map(tuple, recovered)) == sorted(tuple(r[0]) for r in data)
    assert packing_efficiency(packed, 8) == pytest.approx(21 / 24)


def test_rows_longer_than_the_bin_are_refused() -> None:
    with pytest.raises(ValueError, match="exceed max_len"):
        pack(rows(9), max_len=8)


def test_packed_forward_equals_separate_forwards(tiny_model_dir: Path) -> None:
    """No cross-contamination: each row's logits inside a pack equal its logits alone."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    data = rows(7, 5, 9)
    packed = pack(data, max_len=32)
    assert len(packed) == 1
    batch = collate_packed(
        [{"input_ids": p.input_ids, "labels": p.labels, "position_ids": p.position_ids} for p in packed], pad_token_id=0
    )
    with torch.no_grad():
        packed_logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[
            0
        ]
        offset = 0
        for length in packed[0].seq_lengths:
            ids = packed[0].input_ids[offset : offset + length]
            alone = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
            torch.testing.assert_close(packed_logits[offset : offset + length], alone, atol=1e-5, rtol=1e-4)
            offset += length


def test_padded_collate_masks_padding_by_position_not_by_id() -> None:
    eos = 2
    batch = collate_padded(
        [{"input_ids": [5, 6, eos], "labels": [-100, 6, eos]}, {"input_ids": [7], "labels": [7]}], pad_token_id=eos
    )
    assert batch["labels"].tolist() == [[-100, 6, eos], [7, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
