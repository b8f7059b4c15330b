#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/fs.h"
#include "train/default_corpus.h"
#include "test_util.h"

using namespace pgolf;
using ::testing::HasSubstr;

TEST(DefaultCorpus, FortuneFilesSplitAtPercentLines) {
  test::TempDir dir;
  fs::create_directories(dir / "f");
  write_text_file_atomic(dir / "f" / "b", "second file\n%\n  \n%\nlast one  \n");
  write_text_file_atomic(dir / "f" / "a", "A saying.\n  -- Someone\n%\nTwo\nlines\n%\n");
  write_text_file_atomic(dir / "f" / "a.dat", "binary index, ignored");
  fs::create_symlink(dir / "f" / "a", dir / "f" / "a.u8");  // the packages' .u8 links, ignored
  const auto docs = read_fortune_documents(dir / "f");
  ASSERT_EQ(docs.size(), 4u);
  EXPECT_EQ(docs[0], "A saying.\n  -- Someone");
  EXPECT_EQ(docs[1], "Two\nlines");
  EXPECT_EQ(docs[2], "second file");
  EXPECT_EQ(docs[3], "last one");
}

TEST(DefaultCorpus, MissingPackageIsNamed) {
  try {
    read_fortune_documents("/nonexistent/fortunes");
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_THAT(std::string(e.what()), HasSubstr("fortunes"));
  }
}

// The whole pipeline on a toy corpus, shortened so that it takes seconds: training with validation,
// EMA, packing under the cap, the round trip, sliding and score-first TTT, results.json and the plot.
TEST(CmdRun, WholePipelineOnASmallCorpus) {
  test::TempDir dir;
  fs::create_directories(dir / "fortunes");
  // A small synthetic English-like corpus (repetitive, so the toy model learns it quickly).
  std::string text;
  const char* sentences[] = {"The quick brown fox jumps over the lazy dog.",
                             "A journey of a thousand miles begins with a single step.",
                             "To be or not to be, that is the question.",
                             "All that glitters is not gold; all who wander are not lost."};
  for (int i = 0; i < 1200; ++i) text += std::string(sentences[i % 4]) + " Number " + std::to_string(i % 37) + ".\n%\n";
  write_text_file_atomic(dir / "fortunes" / "toy", text);
  const std::string args = "run --fortunes " + (dir / "fortunes").string() + " --default-data " +
                           (dir / "data").string() + " --out " + (dir / "run").string() +
                           " --device cpu --set iterations=8 --set num_layers=2 --set val_loss_every=4"
                           " --set warmdown_iters=4 --set train_batch_tokens=4096 --set val_max_tokens=4096"
                           " --set eval_stride=128 --set ttt_chunk_tokens=2048 --set ttt_epochs=1"
                           " --set ve_layers=[1] --set xsa_last_n=1";
  const auto r = test::run_pgolf(args);
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("final_roundtrip val_loss:"));
  EXPECT_THAT(r.output, HasSubstr("final_sliding val_loss:"));
  EXPECT_THAT(r.output, HasSubstr("final_ttt-sgd val_loss:"));
  EXPECT_THAT(r.output, HasSubstr("| final val_bpb (ttt-sgd)"));
  const auto j = nlohmann::json::parse(read_text_file(dir / "run" / "results.json"));
  EXPECT_EQ(j["steps"], 8);
  EXPECT_TRUE(j["artifact"]["under_cap"].get<bool>());
  EXPECT_EQ(j["artifact"]["total_bytes"].get<int64_t>(),
            j["artifact"]["model_bytes"].get<int64_t>() + j["artifact"]["code_bytes"].get<int64_t>());
  EXPECT_EQ(static_cast<int64_t>(fs::file_size(dir / "run" / "final_model.pgolf")),
            j["artifact"]["model_bytes"].get<int64_t>());
  // Quantization moves the score a little, not a lot; every bpb is finite and positive.
  const double pre = j["val_pre_quant"]["val_bpb"], post = j["val_post_quant"]["val_bpb"];
  EXPECT_GT(pre, 0.0);
  EXPECT_NEAR(post, pre, 0.05 * pre);
  ASSERT_EQ(j["evals"].size(), 2u);
  EXPECT_EQ(j["evals"][1]["mode"], "ttt-sgd");
  EXPECT_TRUE(j["evals"][1]["legal"].get<bool>());
  EXPECT_EQ(j["val_final"]["mode"], "ttt-sgd");
  EXPECT_GT(fs::file_size(dir / "run" / "curves.png"), 1000u);
  // The prepared corpus is reused by a second run (READY marker), not rebuilt.
  EXPECT_TRUE(fs::exists(dir / "data" / "READY"));
}
