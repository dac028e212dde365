"""Training algorithms, one file each: sft, rft, distill, reinforce, grpo, ppo, dpo, reward_model."""
