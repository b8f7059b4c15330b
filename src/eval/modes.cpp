#include "eval/modes.h"

#include <algorithm>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "dist/communicator.h"
#include "eval/flat.h"
#include "eval/sliding.h"
#include "eval/ttt_chunked.h"
#include "eval/ttt_lora.h"

namespace pgolf {

const std::vector<std::string>& eval_mode_names() {
  static const std::vector<std::string> names = {"flat", "sliding", "ttt-sgd", "ttt-adamw", "ttt-lora", "ttt-phased"};
  return names;
}

void check_eval_mode(const std::string& mode) {
  const auto& n = eval_mode_names();
  PG_CHECK(std::find(n.begin(), n.end(), mode) != n.end(), "unknown evaluation mode \"{}\": expected one of {}", mode,
           fmt::join(n, ", "));
}

bool eval_mode_trains(const std::string& mode) { return mode.rfind("ttt-", 0) == 0; }

EvalOutcome run_eval_mode(const std::string& mode, Engine& engine, Communicator& comm, const Config& c,
                          const EvalInputs& in, ScoreObserver* observer) {
  check_eval_mode(mode);
  PG_CHECK(in.tables != nullptr && in.seq_len > 0, "evaluation inputs: byte tables and T_eval = {} are required",
           in.seq_len);
  if (mode == "flat") {
    const FlatEvalResult r = evaluate_flat(
        engine, comm, in.tokens, *in.tables,
        FlatEvalOptions::from_config(c, resolve_grad_accum(c, comm.world_size()), in.bos_id));
    EvalOutcome out;
    out.mode = mode;
    out.sums.add(r.val_loss * static_cast<double>(r.tokens), static_cast<double>(r.tokens), static_cast<double>(r.bytes));
    out.stream_targets = static_cast<int64_t>(in.tokens.size()) - 1;
    out.score_seconds = r.seconds;
    out.note = fmt::format("sequences of {}", in.seq_len);
    return out;
  }
  if (mode == "sliding")
    return evaluate_sliding(engine, comm, in.tokens, *in.tables, SlidingOptions::from_config(c, in.seq_len), observer);
  if (mode == "ttt-sgd" || mode == "ttt-adamw")
    return evaluate_ttt_chunked(engine, comm, in.tokens, *in.tables,
                                ChunkedTttOptions::from_config(c, in.seq_len, mode == "ttt-adamw"), observer);
  if (mode == "ttt-lora" || mode == "ttt-phased")
    return evaluate_ttt_lora(engine, comm, in.tokens, *in.tables,
                             LoraTttOptions::from_config(c, in.bos_id, mode == "ttt-phased"), observer);
  fail("evaluation mode \"{}\" has no implementation", mode);
}

}  // namespace pgolf
