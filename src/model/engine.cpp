// The default pipeline of Engine (model/engine.h): each call runs when it is submitted.
#include "model/engine.h"

#include <utility>

#include "core/error.h"

namespace pgolf {

void Engine::submit_token_losses(const Batch& batch) {
  PG_CHECK(pending() < kMaxPending, "Engine: {} calls already wait to be collected", pending());
  std::vector<float> nll;
  token_losses(batch, nll);
  completed_.push_back(std::move(nll));
}

void Engine::submit_lora(const Batch& batch, std::span<const float> token_weights) {
  PG_CHECK(pending() < kMaxPending, "Engine: {} calls already wait to be collected", pending());
  std::vector<float> nll;
  lora_score_and_train(batch, token_weights, nll);
  completed_.push_back(std::move(nll));
}

void Engine::collect(std::vector<float>& nll) {
  PG_CHECK(!completed_.empty(), "Engine::collect: no call is pending");
  nll = std::move(completed_.front());
  completed_.pop_front();
}

void Engine::submit_train_step(std::span<const Batch> micro_batches, const StepControl& control) {
  PG_CHECK(train_steps_pending() < kMaxTrainPending, "Engine: {} training steps already wait to be collected",
           train_steps_pending());
  completed_steps_.push_back(train_step(micro_batches, control));
}

StepResult Engine::collect_train_step() {
  PG_CHECK(!completed_steps_.empty(), "Engine::collect_train_step: no training step is pending");
  const StepResult r = completed_steps_.front();
  completed_steps_.pop_front();
  return r;
}

}  // namespace pgolf
