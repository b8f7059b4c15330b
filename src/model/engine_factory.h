// make_engine: the Engine of a backend by name, for the trainer, the evaluator and the benchmarks.
// "cpu" is always available; "cuda" when pgolf was built with the CUDA backend (PGOLF_HAVE_CUDA),
// otherwise it is refused with a message saying so.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "core/config.h"
#include "model/engine.h"

namespace pgolf {

class Communicator;

struct EngineOptions {
  // The largest forward (rows · seq_len) of the CUDA engine, which sizes its activation memory;
  // 0 = default_max_tokens(config, world size). Larger evaluation batches run in row chunks.
  int64_t max_tokens = 0;
  bool deterministic = false;  // CUDA: bit-reproducible gradients (slower backward kernels)
  bool graphs = true;          // CUDA: capture the steps as CUDA graphs
};

// The largest of one rank's training micro-batch (train_batch_tokens / (world_size · accumulation),
// accumulation = grad_accum_steps or 8 / world_size as the references do), one score-first TTT
// batch (ttt_batch_seqs · train_seq_len) and, when eval_modes has ttt-lora or ttt-phased, one LoRA
// TTT batch (ttt_batch_size documents · ttt_eval_seq_len).
int64_t default_max_tokens(const Config& config, int world_size);

// device: "cpu" or "cuda".
std::unique_ptr<Engine> make_engine(const Config& config, Communicator& comm, const std::string& device,
                                    const EngineOptions& options = {});

bool cuda_available();  // pgolf was built with the CUDA backend

// "auto" → "cuda" when pgolf has the CUDA backend and a GPU is present, else "cpu"; "cpu" and "cuda"
// pass through (an unknown name is an error).
std::string resolve_device(const std::string& requested);

}  // namespace pgolf
