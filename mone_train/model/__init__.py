"""The MoNE GPT model: megatron-core GPTModel with MoNE experts plugged into its MoE layers."""
