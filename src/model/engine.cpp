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

}  // namespace pgolf
