"""Proposed changes to modeling_mqwen.py, measured here on a scratch copy before they land.

`--patch labelled-logits` adds a contender "MQwen + patch" to figure 3: the same model whose
`forward` is `labelled_logits_forward` below during its own calls only (the class attribute is swapped
in and out around each call, so the other contenders never see it).

labelled-logits: in training, run the LM head only where a next token is scored. A caption sample is
mostly image placeholders and prompt, all labelled -100 (here 291 of 332 positions); their logits are
computed, upcast to fp32 by the loss and thrown away. With 1D `logits_to_keep` (supported by
transformers' causal LMs on 4.57 and 5.x) the head sees only the positions some sample in the batch
scores, and the loss is the LM's own `loss_function` on the same tokens, via `shift_labels`. The loss is
unchanged (`check_same_loss`); `outputs.logits` then covers the kept positions only, which is why the
patch limits itself to `model.training` with the default `logits_to_keep=0`.
"""

import contextlib

import torch
import torch.nn.functional as F

from mqwen.modeling_mqwen import MQwenForCausalLM

_ORIGINAL_FORWARD = MQwenForCausalLM.forward


def labelled_logits_forward(
    self,
    input_ids=None,
    pixel_values=None,
    attention_mask=None,
    position_ids=None,
    inputs_embeds=None,
    labels=None,
    logits_to_keep=0,
    **kwargs,
):
    """MQwenForCausalLM.forward, with the LM head restricted to labelled positions when training."""
    inputs_embeds = self._embed(input_ids, pixel_values, inputs_embeds, kwargs)
    if labels is not None and input_ids is not None:
        labels = labels.masked_fill(input_ids == self.config.image_token_id, -100)
    if labels is not None and self.training and isinstance(logits_to_keep, int) and logits_to_keep == 0:
        # position p is scored if some sample's token p+1 has a label
        shift_labels = F.pad(labels, (0, 1), value=-100)[:, 1:]
        keep = (shift_labels != -100).any(dim=0).nonzero().squeeze(-1)
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=keep,
            **kwargs,
        )
        outputs.loss = self.language_model.loss_function(
            logits=outputs.logits,
            labels=None,
            shift_labels=shift_labels[:, keep],
            vocab_size=self.config.text_config.vocab_size,
            num_items_in_batch=kwargs.get("num_items_in_batch"),
        )
        return outputs
    return self.language_model(
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        labels=labels,
        logits_to_keep=logits_to_keep,
        **kwargs,
    )


PATCHES = {"labelled-logits": labelled_logits_forward}


@contextlib.contextmanager
def applied(name):
    """MQwenForCausalLM.forward replaced by patch `name` inside the block, restored after it."""
    MQwenForCausalLM.forward = PATCHES[name]
    try:
        yield
    finally:
        MQwenForCausalLM.forward = _ORIGINAL_FORWARD


def check_same_loss(model, batch, name, rtol=1e-5):
    """The patched forward must give the unpatched loss on `batch` (train mode, no dropout); raises if not."""
    was_training = model.training
    model.train()
    with torch.no_grad():
        before = model(**batch).loss
        with applied(name):
            after = model(**batch).loss
    model.train(was_training)
    if not torch.allclose(before.float(), after.float(), rtol=rtol, atol=1e-6):
        raise RuntimeError(f"patch {name!r} changes the training loss: {before.item()} -> {after.item()}")
    return before.item(), after.item()
