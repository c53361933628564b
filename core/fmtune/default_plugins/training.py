"""Default collator, trainer (transformers ``Trainer``) and final save."""

from __future__ import annotations

from fmtune import hookimpl


@hookimpl(trylast=True)
def build_collator(tokenizer, config):
    from transformers import DataCollatorForSeq2Seq

    # Pads input_ids with the pad token, labels with -100, and builds attention_mask.
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)


@hookimpl(trylast=True)
def build_trainer(model, tokenizer, config, train_dataset, eval_dataset, data_collator,
                  training_args, callbacks):
    from transformers import Trainer

    return Trainer(model=model, args=training_args, data_collator=data_collator,
                   train_dataset=train_dataset, eval_dataset=eval_dataset,
                   processing_class=tokenizer, callbacks=callbacks)


@hookimpl(trylast=True)
def save(model, tokenizer, output_dir, config, trainer):
    trainer.save_model(output_dir)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(output_dir)
    return output_dir
