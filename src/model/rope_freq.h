/* rope_freq.h — RoPE inverse frequencies and attention factor for every rope_type, computed the
 * way transformers' rope init functions do (modeling_rope_utils.py): float32 tensor arithmetic
 * where transformers uses tensors, double where it uses Python floats. */
#ifndef TUNA_MODEL_ROPE_FREQ_H
#define TUNA_MODEL_ROPE_FREQ_H

#include <stdint.h>

#include "io/hf_config.h"

/* The number of rotated dims: int(head_dim * partial_rotary_factor), even. */
int64_t tuna_rope_rot_dim(const struct tuna_arch *a);

/* Fills inv_freq[rot_dim/2] and *attn_factor (cos/sin multiplier; 1 except YaRN).
 * seq_len matters only for dynamic NTK (the longest sequence in the step, as transformers' dynamic
 * update uses max(position_ids) + 1); pass 0 otherwise. */
void tuna_rope_inv_freq(const struct tuna_arch *a, int64_t seq_len, float *inv_freq, float *attn_factor);

#endif
