#include <gtest/gtest.h>

#include "model/config.h"
#include "test_util.h"

using namespace pgolf;

static int64_t count_for(const std::string& preset) {
  return param_count(ModelConfig::from_config(Config::load(preset)));
}

// SPEC §10 / ENGINEERING §3: the reference scripts' exact parameter counts at full size.
TEST(ParamCount, FullSizePresets) {
  EXPECT_EQ(count_for("baseline"), 17059912);
  EXPECT_EQ(count_for("s691"), 26993756);
  EXPECT_EQ(count_for("s562"), 24509621);
  EXPECT_EQ(count_for("s600"), 27561560);
  EXPECT_EQ(count_for("s1560"), 35944602);
}

TEST(ParamCount, Pr549With1536Buckets) {
  Config c = Config::load("s691");
  c.set_from_string("bigram_vocab_size=1536");
  EXPECT_EQ(param_count(ModelConfig::from_config(c)), 26928220);
}

TEST(ParamCount, InspectJsonReportsTheCount) {
  auto r = test::run_pgolf("inspect --preset s691 --json");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("\"params\":26993756"), std::string::npos) << r.output;
}
