#include <gtest/gtest.h>

#include "core/config.h"
#include "core/error.h"

using namespace pgolf;

TEST(Config, PresetsInheritDefaults) {
  Config c = Config::load("s691");
  EXPECT_EQ(c.get_int("num_layers"), 11);
  EXPECT_EQ(c.get_int("model_dim"), 512);  // from defaults.toml
  EXPECT_DOUBLE_EQ(c.get_double("matrix_lr"), 0.025);
  EXPECT_EQ(c.get_int_list("ve_layers"), (std::vector<int64_t>{9, 10}));
}

TEST(Config, OverridesAreTypeChecked) {
  Config c = Config::load("baseline");
  c.set_from_string("num_layers=11");
  EXPECT_EQ(c.get_int("num_layers"), 11);
  c.set_from_string("matrix_lr=1");  // an integer literal for a float key
  EXPECT_DOUBLE_EQ(c.get_double("matrix_lr"), 1.0);
  c.set_from_string("compressor=zstd");  // a bare word is a string
  EXPECT_EQ(c.get_string("compressor"), "zstd");
  EXPECT_THROW(c.set_from_string("num_layerz=3"), Error);
  EXPECT_THROW(c.set_from_string("num_layers=2.5"), Error);
  EXPECT_THROW(c.set_from_string("ema_enabled=3"), Error);
  EXPECT_THROW(c.set_from_string("novalue"), Error);
}

TEST(Config, ResolvedTomlReloads) {
  Config c = Config::load("s1560");
  c.set_from_string("seed=7");
  Config r = Config::from_toml(c.to_toml(), "resolved");
  EXPECT_EQ(r.values(), c.values());
}

TEST(Config, UnknownPresetNamesTheKnownOnes) {
  try {
    Config::load("no_such_preset");
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("s691"), std::string::npos) << e.what();
  }
}
