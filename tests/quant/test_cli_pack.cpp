// pgolf pack / unpack / inspect end to end on a small s691 (and s1560 with Hessians) checkpoint.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "core/fs.h"
#include "core/safetensors.h"
#include "quant/artifact.h"
#include "quant/pack.h"
#include "small_models.h"
#include "test_util.h"

using namespace pgolf;
using ::testing::HasSubstr;

namespace {

std::filesystem::path build_dir() { return std::filesystem::path(PGOLF_BINARY).parent_path(); }

std::string preset_args(const std::string& preset) {
  std::string s = " --preset " + preset;
  for (const auto& kv : test::small_settings(preset)) s += " --set " + kv;
  return s;
}

nlohmann::json run_json(const std::string& args) {
  auto r = test::run_pgolf(args);
  EXPECT_EQ(r.status, 0) << r.output;
  return nlohmann::json::parse(r.output);
}

class PackCli : public ::testing::Test {
 protected:
  void SetUp() override {
    cfg_ = test::small_config("s691");
    params_ = stand_in_parameters(cfg_, 0.1, 3);
    TensorMap ck = params_;
    ck.set("optimizer/exp_avg.tok_emb.weight", params_.get("tok_emb.weight"));  // ignored by pack
    save_safetensors(dir_ / "ck.safetensors", ck);
  }
  std::string pack_args(const std::string& extra = "") {
    return "pack --checkpoint " + (dir_ / "ck.safetensors").string() + preset_args("s691") + " --out " +
           (dir_ / "a.pgolf").string() + extra;
  }
  test::TempDir dir_;
  Config cfg_;
  TensorMap params_;
};

TEST_F(PackCli, ReportsModelAndCodeBytesAgainstTheCap) {
  const auto j = run_json(pack_args(" --json"));
  const auto model_bytes = std::filesystem::file_size(dir_ / "a.pgolf");
  const auto code_bytes = std::filesystem::file_size(build_dir() / "pgolf_code.tar.xz");
  EXPECT_EQ(j["model_bytes"].get<uint64_t>(), model_bytes);
  EXPECT_EQ(j["code_bytes"].get<uint64_t>(), code_bytes);
  EXPECT_EQ(j["total_bytes"].get<uint64_t>(), model_bytes + code_bytes);
  EXPECT_EQ(j["cap_bytes"].get<int64_t>(), 16000000);
  EXPECT_TRUE(j["under_cap"].get<bool>());
  EXPECT_EQ(j["scheme"], "gptq_lite");
  EXPECT_EQ(j["compressor"], "zstd-22");
  EXPECT_EQ(j["tensors"].get<size_t>(), params_.size());
  EXPECT_GE(j["quantize_seconds"].get<double>(), 0.0);
  EXPECT_GE(j["compress_seconds"].get<double>(), 0.0);
  const auto text = test::run_pgolf(pack_args(" --compressor lzma-9e"));
  ASSERT_EQ(text.status, 0) << text.output;
  EXPECT_THAT(text.output, HasSubstr("compressor lzma-9e"));
  EXPECT_THAT(text.output, HasSubstr("under_cap"));
}

TEST_F(PackCli, FitsUnderASmallCapByPruningUnitCodesOrSaysOver) {
  const auto unpruned = run_json(pack_args(" --json"));
  EXPECT_EQ(unpruned["fit"]["mode"], "none");
  const int64_t total = unpruned["total_bytes"].get<int64_t>();
  const int64_t cap = total - unpruned["model_bytes"].get<int64_t>() / 50;  // 2 % of the model too small
  const std::string cap_set = " --set artifact_cap_bytes=" + std::to_string(cap);

  const auto over = run_json(pack_args(cap_set + " --json"));
  EXPECT_FALSE(over["under_cap"].get<bool>());
  EXPECT_GT(over["total_bytes"].get<int64_t>(), cap);  // (the header's config text differs by the --set values)
  EXPECT_EQ(over["fit"]["pruned"].get<int64_t>(), 0);
  const auto text = test::run_pgolf(pack_args(cap_set));
  ASSERT_EQ(text.status, 0) << text.output;
  EXPECT_THAT(text.output, HasSubstr("OVER THE CAP"));

  const auto fitted = run_json(pack_args(cap_set + " --set artifact_fit=prune_pm1 --json"));
  EXPECT_TRUE(fitted["under_cap"].get<bool>());
  EXPECT_EQ(fitted["cap_bytes"].get<int64_t>(), cap);
  EXPECT_LE(fitted["total_bytes"].get<int64_t>(), cap);
  EXPECT_EQ(fitted["model_bytes"].get<int64_t>(), static_cast<int64_t>(std::filesystem::file_size(dir_ / "a.pgolf")));
  EXPECT_GT(fitted["fit"]["model_bytes_before"].get<int64_t>() + fitted["code_bytes"].get<int64_t>(), cap);
  EXPECT_GT(fitted["fit"]["pruned"].get<int64_t>(), 0);
  EXPECT_LT(fitted["fit"]["pruned"].get<int64_t>(), fitted["fit"]["candidates"].get<int64_t>());

  const auto impossible = test::run_pgolf(pack_args(" --set artifact_fit=prune_pm1 --set artifact_cap_bytes=1000"));
  EXPECT_NE(impossible.status, 0);
  EXPECT_THAT(impossible.output, HasSubstr("cannot fit"));
}

TEST_F(PackCli, UnpackWritesTheDequantizedCheckpoint) {
  ASSERT_EQ(test::run_pgolf(pack_args()).status, 0);
  const auto j = run_json("unpack --json --artifact " + (dir_ / "a.pgolf").string() + " --out " +
                          (dir_ / "deq.safetensors").string());
  EXPECT_EQ(j["tensors"].get<size_t>(), params_.size());
  const TensorMap deq = load_safetensors(dir_ / "deq.safetensors");
  const TensorMap expected = artifact_weights(read_artifact(dir_ / "a.pgolf"));
  EXPECT_EQ(deq.names(), params_.names());
  for (const auto& n : deq.names()) EXPECT_EQ(deq.get(n).bytes, expected.get(n).bytes) << n;
  // GPTQ-lite int6 of N(0, 0.1²) weights: every row's clip is below 1, so the step is the fp16 1/31
  // floor and rounding errs by at most half of it.
  const auto w = params_.get("blocks.0.mlp.fc.weight").as<float>();
  const auto d = deq.get("blocks.0.mlp.fc.weight").as<float>();
  for (size_t i = 0; i < w.size(); ++i) ASSERT_NEAR(d[i], w[i], 0.5 / 31) << i;
}

TEST_F(PackCli, InspectDescribesTheArtifact) {
  ASSERT_EQ(test::run_pgolf(pack_args()).status, 0);
  const auto j = run_json("inspect --json " + (dir_ / "a.pgolf").string());
  EXPECT_EQ(j["preset"], "s691");
  EXPECT_EQ(j["scheme"], "gptq_lite");
  EXPECT_EQ(j["file_bytes"].get<uint64_t>(), std::filesystem::file_size(dir_ / "a.pgolf"));
  ASSERT_EQ(j["tensors"].size(), params_.size());
  for (const auto& t : j["tensors"]) {
    if (t["name"] == "blocks.3.attn.c_q.weight") {
      EXPECT_EQ(t["label"], "int6");
    }
  }
  const auto text = test::run_pgolf("inspect " + (dir_ / "a.pgolf").string());
  ASSERT_EQ(text.status, 0) << text.output;
  EXPECT_THAT(text.output, HasSubstr("scheme gptq_lite, compressor zstd-22"));
  EXPECT_THAT(text.output, HasSubstr("blocks.10.mlp.proj.weight"));
  // A checkpoint is described as one (its parameters and optimizer state), not as an artifact.
  const auto ck = test::run_pgolf("inspect " + (dir_ / "ck.safetensors").string());
  ASSERT_EQ(ck.status, 0) << ck.output;
  EXPECT_THAT(ck.output, HasSubstr("checkpoint "));
  EXPECT_THAT(ck.output, HasSubstr("params"));
  // Any other file is read as a token shard and refused with the shard's own message.
  write_text_file_atomic(dir_ / "notes.txt", "not a shard, not an artifact");
  const auto bad = test::run_pgolf("inspect " + (dir_ / "notes.txt").string());
  EXPECT_NE(bad.status, 0);
  EXPECT_THAT(bad.output, HasSubstr("notes.txt"));
}

TEST_F(PackCli, DamagedArtifactsAndMissingInputsAreRefused) {
  ASSERT_EQ(test::run_pgolf(pack_args()).status, 0);
  auto bytes = read_file(dir_ / "a.pgolf");
  bytes[bytes.size() / 2] ^= 0x40;
  write_file_atomic(dir_ / "bad.pgolf", bytes);
  const auto r = test::run_pgolf("unpack --artifact " + (dir_ / "bad.pgolf").string() + " --out " +
                                 (dir_ / "x.safetensors").string());
  EXPECT_EQ(r.status, 1);
  EXPECT_THAT(r.output, HasSubstr("damaged artifact"));
  EXPECT_FALSE(std::filesystem::exists(dir_ / "x.safetensors"));
  const auto c = test::run_pgolf(pack_args(" --code-archive " + (dir_ / "none.tar.xz").string()));
  EXPECT_NE(c.status, 0);
  EXPECT_THAT(c.output, HasSubstr("none.tar.xz"));
  const auto s = test::run_pgolf("pack --checkpoint " + (dir_ / "ck.safetensors").string() + " --preset s691" +
                                 " --out " + (dir_ / "b.pgolf").string());
  EXPECT_NE(s.status, 0);  // full-size s691 parameters are not in this small checkpoint
  EXPECT_THAT(s.output, HasSubstr("has shape"));
}

TEST(PackCliGptq, GptqFullTakesHessiansFromAFile) {
  test::TempDir dir;
  const Config cfg = test::small_config("s1560");
  const TensorMap params = stand_in_parameters(cfg, 0.1, 4);
  save_safetensors(dir / "ck.safetensors", params);
  save_safetensors(dir / "h.safetensors", test::random_hessians(params, 1024, 5));
  const std::string base = "pack --checkpoint " + (dir / "ck.safetensors").string() + preset_args("s1560") +
                           " --out " + (dir / "a.pgolf").string();
  const auto missing = test::run_pgolf(base);
  EXPECT_NE(missing.status, 0);
  EXPECT_THAT(missing.output, HasSubstr("gptq_full needs Hessians"));
  const auto j = run_json(base + " --json --hessians " + (dir / "h.safetensors").string());
  EXPECT_EQ(j["compressor"], "brotli-11+shuffle2");
  EXPECT_EQ(j["tensors_per_method"]["gptq (int6)"].get<int>(), 66);
  EXPECT_EQ(j["tensors_per_method"]["gptq (int8)"].get<int>(), 1);
  ASSERT_EQ(test::run_pgolf("unpack --artifact " + (dir / "a.pgolf").string() + " --out " +
                            (dir / "d.safetensors").string())
                .status,
            0);
  EXPECT_EQ(load_safetensors(dir / "d.safetensors").names(), params.names());  // banks rebuilt
}

TEST(CodeArchive, IsReproducedByteForByteFromTheSameSources) {
  test::TempDir dir;
  const auto out = dir / "again.tar.xz";
  const std::string cmd = "cmake -DSOURCE_DIR=" + std::string(PGOLF_SOURCE_DIR) +
                          " -DLIST=" + (build_dir() / "pgolf_code_files.txt").string() + " -DOUT=" + out.string() +
                          " -DSTRIP=" + (build_dir() / "pgolf_code_strip").string() +
                          " -P " + std::string(PGOLF_SOURCE_DIR) + "/cmake/code_archive.cmake";
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  EXPECT_EQ(read_file(out), read_file(build_dir() / "pgolf_code.tar.xz"));
  const std::string list = read_text_file(build_dir() / "pgolf_code_files.txt");
  EXPECT_THAT(list, HasSubstr("src/quant/artifact.cpp\n"));
  EXPECT_THAT(list, HasSubstr("configs/s691.toml\n"));
  EXPECT_THAT(list, HasSubstr("scripts/setup.sh\n"));
  EXPECT_THAT(list, ::testing::Not(HasSubstr("tests/")));
  // The archive holds the minified sources: no comment survives in a C++ file.
  const std::string listing = "tar -xJOf " + (build_dir() / "pgolf_code.tar.xz").string() +
                              " src/quant/artifact.cpp > " + (dir / "artifact.cpp").string();
  ASSERT_EQ(std::system(listing.c_str()), 0) << listing;
  const std::string minified = read_text_file(dir / "artifact.cpp");
  EXPECT_THAT(minified, HasSubstr("namespace pgolf"));
  EXPECT_THAT(minified, ::testing::Not(HasSubstr("// ")));
  EXPECT_LT(minified.size(), std::filesystem::file_size(std::string(PGOLF_SOURCE_DIR) + "/src/quant/artifact.cpp"));
  EXPECT_EQ(code_archive_bytes(build_dir() / "pgolf_code.tar.xz"),
            static_cast<int64_t>(std::filesystem::file_size(build_dir() / "pgolf_code.tar.xz")));
}

}  // namespace
