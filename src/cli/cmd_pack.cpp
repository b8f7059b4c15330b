// pgolf pack: quantize a checkpoint with its preset's export, compress it into an artifact, and report
// model bytes + code bytes against the 16,000,000-byte cap.
#include <fmt/core.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <map>

#include "cli/commands.h"
#include "core/safetensors.h"
#include "quant/compress.h"
#include "quant/fit.h"
#include "quant/pack.h"

namespace pgolf::cli {

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

struct PackArgs {
  PresetOptions preset;
  std::string checkpoint, out, compressor, hessians, code_archive;
  bool as_json = false;
};

void run_pack(const PackArgs& args) {
  Config cfg = args.preset.resolve();
  if (!args.compressor.empty()) apply_compressor_spec(cfg, args.compressor);
  const fs::path archive = args.code_archive.empty() ? default_code_archive() : fs::path(args.code_archive);
  const int64_t code_bytes = code_archive_bytes(archive);

  const TensorMap params = select_parameters(cfg, load_safetensors(args.checkpoint), args.checkpoint);
  TensorMap hessians;
  if (!args.hessians.empty()) hessians = load_safetensors(args.hessians);

  auto t0 = std::chrono::steady_clock::now();
  Artifact artifact = build_artifact(cfg, params, args.hessians.empty() ? nullptr : &hessians);
  const double quantize_s = seconds_since(t0);
  t0 = std::chrono::steady_clock::now();
  const FittedArtifact fitted = fit_artifact(artifact, FitOptions::from_config(cfg, code_bytes));
  const auto& bytes = fitted.file;
  const ArtifactSizes& sizes = fitted.sizes;
  const FitReport& fit = fitted.report;
  const double compress_s = seconds_since(t0);
  t0 = std::chrono::steady_clock::now();
  parse_artifact(bytes, args.out);  // verify before writing: checksums, decompression, tables
  const double verify_s = seconds_since(t0);
  write_file_atomic(args.out, bytes);

  const int64_t model_bytes = static_cast<int64_t>(bytes.size());
  const int64_t total = model_bytes + code_bytes, cap = fit.cap_bytes;
  std::map<std::string, int> per_label;
  for (const auto& t : artifact.model.tensors) ++per_label[t.plan.label];
  if (args.as_json) {
    nlohmann::json j = {{"artifact", args.out},
                        {"preset", artifact.preset},
                        {"scheme", artifact.scheme},
                        {"compressor", artifact.compression.name()},
                        {"tensors", artifact.model.tensors.size()},
                        {"tensors_per_method", per_label},
                        {"payload_bytes", sizes.payload_bytes},
                        {"model_bytes", model_bytes},
                        {"code_bytes", code_bytes},
                        {"code_archive", archive.string()},
                        {"total_bytes", total},
                        {"cap_bytes", cap},
                        {"under_cap", fit.under_cap()},
                        {"fit", fit.to_json()},
                        {"quantize_seconds", quantize_s},
                        {"compress_seconds", compress_s},
                        {"verify_seconds", verify_s}};
    fmt::print("{}\n", j.dump());
    return;
  }
  fmt::print("pack {}: {} tensors, scheme {}, compressor {}\n", artifact.preset, artifact.model.tensors.size(),
             artifact.scheme, artifact.compression.name());
  for (const auto& [label, n] : per_label) fmt::print("  {:<22} {:>4} tensors\n", label, n);
  fmt::print("  payload_bytes {:>12}  (uncompressed: codes {}, scales {}, passthrough {}, header {})\n",
             sizes.payload_bytes, sizes.codes_bytes, sizes.scales_bytes, sizes.passthrough_bytes, sizes.header_bytes);
  fmt::print("  model_bytes   {:>12}\n", model_bytes);
  fmt::print("  code_bytes    {:>12}  ({})\n", code_bytes, archive.string());
  if (fit.pruned > 0)
    fmt::print("  fit {}: zeroed {} of {} codes of magnitude 1 (model was {} bytes; {} compressions in {} rounds, "
               "k within {} of the smallest)\n",
               artifact_fit_name(fit.mode), fit.pruned, fit.candidates, fit.model_bytes_before, fit.compressions,
               fit.rounds, fit.tolerance);
  fmt::print("  total_bytes   {:>12}  cap {}: {} (margin {})\n", total, cap, fit.under_cap() ? "under_cap" : "OVER THE CAP",
             cap - total);
  fmt::print("  quantize {:.2f} s, compress {:.2f} s, verify {:.2f} s\n", quantize_s, compress_s, verify_s);
  fmt::print("wrote {}\n", args.out);
}

}  // namespace

void register_pack(CLI::App& app) {
  auto* cmd = app.add_subcommand("pack", "quantize + compress a checkpoint into an artifact; report bytes vs the cap");
  static PackArgs args;
  args.preset.add_to(cmd, true);
  cmd->add_option("--checkpoint", args.checkpoint, "safetensors checkpoint (reference parameter names)")->required();
  cmd->add_option("--out", args.out, "artifact file to write")->required();
  cmd->add_option("--compressor", args.compressor,
                  "override the preset's compressor: NAME[-LEVEL[e]], e.g. zstd-22, lzma-6, lzma-9e, brotli-11, zlib-9");
  cmd->add_option("--hessians", args.hessians,
                  "safetensors of hessian/<weight name> tensors (needed by quant_scheme gptq_full)");
  cmd->add_option("--code-archive", args.code_archive,
                  "the code archive whose size is the code bytes (default: pgolf_code.tar.xz beside pgolf)");
  cmd->add_flag("--json", args.as_json, "print one JSON object");
  cmd->callback([] { run_pack(args); });
}

}  // namespace pgolf::cli
