#include "quant/pack.h"

#include <unistd.h>

#include "model/config.h"
#include "quant/banks.h"

namespace pgolf {

TensorMap select_parameters(const Config& cfg, const TensorMap& checkpoint, const std::string& what) {
  const ModelConfig m = ModelConfig::from_config(cfg);
  TensorMap out;
  for (const auto& spec : param_specs(m)) {
    PG_CHECK(checkpoint.has(spec.name), "{}: parameter '{}' of preset {} is missing", what, spec.name,
             cfg.preset_name());
    const HostTensor& t = checkpoint.get(spec.name);
    PG_CHECK(t.shape == spec.shape, "{}: parameter '{}' has shape {}, preset {} expects {}", what, spec.name,
             shape_str(t.shape), cfg.preset_name(), shape_str(spec.shape));
    PG_CHECK(t.dtype == DType::F32 || t.dtype == DType::BF16 || t.dtype == DType::F16 || t.dtype == DType::F64,
             "{}: parameter '{}' has dtype {}, expected a float type", what, spec.name, dtype_name(t.dtype));
    out.set(spec.name, t);
  }
  return out;
}

Artifact build_artifact(const Config& cfg, const TensorMap& params, const TensorMap* hessians) {
  Artifact a;
  a.preset = cfg.preset_name();
  a.config_toml = cfg.to_toml();
  a.scheme = cfg.get_string("quant_scheme");
  a.compression = CompressionSpec::from_config(cfg);
  a.checkpoint_names = params.names();
  const bool banked = has_banks(params);
  if (banked) {
    PG_CHECK(params.has("qo_bank"), "banked parameters without qo_bank: cannot tell the layer count");
    a.bank_layers = params.get("qo_bank").shape.at(0) / 2;
  }
  a.model = quantize_model(banked ? unbank(params) : params, QuantOptions::from_config(cfg), hessians);
  return a;
}

fs::path default_code_archive() {
  char buf[4096];
  const ssize_t n = ::readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  PG_CHECK(n > 0, "cannot locate the running pgolf binary (/proc/self/exe) to find its code archive");
  buf[n] = '\0';
  return fs::path(buf).parent_path() / "pgolf_code.tar.xz";
}

int64_t code_archive_bytes(const fs::path& archive) {
  std::error_code ec;
  const auto size = fs::file_size(archive, ec);
  PG_CHECK(!ec, "code archive {} is not readable ({}); it is made by the build beside the pgolf binary, or give "
           "--code-archive", archive.string(), ec.message());
  return static_cast<int64_t>(size);
}

}  // namespace pgolf
