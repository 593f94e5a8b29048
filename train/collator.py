"""Turns `CaptionDataset` examples into right-padded training batches with answer-only labels.

Each example becomes a conversation rendered with the processor's chat template:

    <|im_start|>system ... <|im_end|>\\n<|im_start|>user\\n<image>\\n{instruction}<|im_end|>\\n
    <|im_start|>assistant\\n{caption}<|im_end|>\\n

The whole string is tokenized at once (exactly what the chat template gives at inference), and the labels
are the input ids on the answer tokens and the end-of-turn token `<|im_end|>`, -100 everywhere else: the
system and user turns, the image placeholders, the role headers, the newline after `<|im_end|>` and the
padding. Which tokens belong to an answer is read from the tokenizer's character offsets, so no piecewise
tokenization can disagree with the real one.
"""

from typing import Any

import torch

IGNORE_INDEX = -100
END_OF_TURN = "<|im_end|>"


def example_messages(example: dict) -> list[dict]:
    """The chat messages of one example: a sampled caption request and the caption, or a LLaVA conversation."""
    if example.get("conversation") is None:
        return [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": example["instruction"]}]},
            {"role": "assistant", "content": example["caption"]},
        ]
    messages, image_placed = [], False
    for turn in example["conversation"]:
        content = turn["content"]
        if turn["role"] == "user" and not image_placed:
            text = content.replace("<image>\n", "").replace("\n<image>", "").replace("<image>", "").strip()
            content = [{"type": "image"}, {"type": "text", "text": text}]
            image_placed = True
        messages.append({"role": turn["role"], "content": content})
    if not image_placed:
        raise ValueError("A conversation needs a user turn to carry its image.")
    return messages


class CaptionCollator:
    """Batches examples into `input_ids`, `attention_mask`, `pixel_values`, `labels` (and `skipped`).

    Args:
        processor: an `MQwenProcessor`.
        max_length: cut longer examples to this many tokens (never into the image placeholders).
        end_of_turn: the string of the token that closes an assistant turn and is learnt with the answer.
    """

    def __init__(self, processor: Any, max_length: int | None = None, end_of_turn: str = END_OF_TURN):
        self.processor = processor
        self.max_length = max_length
        self.end_of_turn = end_of_turn

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.processor.tokenizer.apply_chat_template(
            messages,
            chat_template=self.processor.chat_template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    def text_and_answer_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans `[start, end)` of each answer + end-of-turn."""
        text = self.render(messages)
        spans = []
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prefix = self.render(messages[:k], add_generation_prompt=True)
            through = text if k == len(messages) - 1 else self.render(messages[: k + 1])
            if not (through.startswith(prefix) and text.startswith(through)):
                raise ValueError(
                    "The chat template does not render conversations prefix by prefix (ChatML does), so answer "
                    "tokens cannot be located. Use MQwen's CHAT_TEMPLATE."
                )
            end = through.rfind(self.end_of_turn)
            if end < len(prefix):
                raise ValueError(f"The chat template does not close assistant turns with {self.end_of_turn!r}.")
            spans.append((len(prefix), end + len(self.end_of_turn)))
        return text, spans

    def _expanded(self, text, position):
        """`position` in `text` as a position in the text after `<image>` expansion (what is tokenized)."""
        token = self.processor.image_token
        extra = (self.processor.image_seq_length - 1) * len(token)
        return position + extra * text.count(token, 0, position)

    def __call__(self, examples: list[dict]) -> dict[str, Any]:
        texts, spans, images, skipped = [], [], [], []
        for example in examples:
            skipped.extend(example.get("skipped") or ())
            text, answer_spans = self.text_and_answer_spans(example_messages(example))
            texts.append(text)
            spans.append([(self._expanded(text, s), self._expanded(text, e)) for s, e in answer_spans])
            images.append(example["image"])
        batch = self.processor(
            images=images,
            text=texts,
            padding=True,
            padding_side="right",
            return_offsets_mapping=True,
            return_tensors="pt",
        )
        offsets = batch.pop("offset_mapping")
        starts = offsets[..., 0]
        real = (offsets[..., 1] > starts) & batch["attention_mask"].bool()
        in_answer = torch.zeros_like(real)
        for row, row_spans in enumerate(spans):
            for start, end in row_spans:
                in_answer[row] |= (starts[row] >= start) & (starts[row] < end)
        labels = batch["input_ids"].masked_fill(~(in_answer & real), IGNORE_INDEX)
        result = {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "pixel_values": batch["pixel_values"],
            "labels": labels,
        }
        if self.max_length is not None and result["input_ids"].shape[1] > self.max_length:
            result = self._truncate(result)
        result["skipped"] = skipped
        return result

    def _truncate(self, batch):
        kept = {k: v[:, : self.max_length] for k, v in batch.items() if k != "pixel_values"}
        image_id = self.processor.image_token_id
        before = (batch["input_ids"] == image_id).sum(1)
        after = (kept["input_ids"] == image_id).sum(1)
        if not torch.equal(before, after):
            raise ValueError(
                f"max_length={self.max_length} would cut image placeholders ({self.processor.image_seq_length} "
                "tokens per image); raise max_length above the prompt length."
            )
        kept["pixel_values"] = batch["pixel_values"]
        return kept
