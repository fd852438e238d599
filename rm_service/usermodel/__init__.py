"""The user model: a causal LM fine-tuned on the store's real user turns to write the next user
turn of a conversation, or to end it (docs/user-model.md).

- settings:  UserModelSettings (RM_USER_*)
- format:    the formatting contract (what is learned: user-turn tokens and the end decision)
- runtime:   the model, its tokenizer and precision; teacher-forced NLL and P(end)
- data:      the store's conversations, split by conversation as the reward model splits them
- fit:       the fine-tune (full or LoRA), with a time budget and early stopping
- generate:  batched sampling with a KV cache (what SimulateUser runs)
- version:   a user-model version on disk, its golden items and the one loader
- run:       `rm-service user-model train`: snapshot -> split -> fit -> metrics -> registry
- evaluate:  `rm-service user-model eval`: NLL and perplexity against the base model, sampled
             lengths (KS), distinct-2, calibration of the end event
"""
