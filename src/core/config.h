// Configuration: flat key = value presets in TOML (configs/*.toml). Every preset inherits, directly
// or through another preset, from configs/defaults.toml, which declares every key with its type and
// default; a key that is not declared there is an error (typos do not pass silently). Keys use the
// reference scripts' hyperparameter names in lower case.
#pragma once

#include <nlohmann/json_fwd.hpp>

#include <cstdint>
#include <map>
#include <string>
#include <variant>
#include <vector>

#include "core/fs.h"

namespace pgolf {

using ConfigValue = std::variant<bool, int64_t, double, std::string, std::vector<int64_t>, std::vector<double>,
                                 std::vector<std::string>>;

class Config {
 public:
  // `preset` is a preset name (looked up in the configs directory) or a path to a .toml file.
  static Config load(const std::string& preset);
  // Parses TOML text (inheritance resolved against the configs directory).
  static Config from_toml(const std::string& text, const std::string& what);

  // Applies "key=value" (value is a TOML literal; bare words are strings). Unknown key or a value of
  // the wrong type is an error naming the key and the expected type.
  void set_from_string(const std::string& assignment);
  void set(const std::string& key, ConfigValue v);
  // Declares a key with its default (only while loading configs/defaults.toml).
  void set_declared_for_defaults(const std::string& key, ConfigValue v);

  bool has(const std::string& key) const { return values_.count(key) != 0; }
  bool get_bool(const std::string& key) const;
  int64_t get_int(const std::string& key) const;
  double get_double(const std::string& key) const;  // ints are accepted
  std::string get_string(const std::string& key) const;
  std::vector<int64_t> get_int_list(const std::string& key) const;
  std::vector<double> get_double_list(const std::string& key) const;
  std::vector<std::string> get_string_list(const std::string& key) const;

  const std::string& preset_name() const { return preset_name_; }
  const std::map<std::string, ConfigValue>& values() const { return values_; }

  std::string to_toml() const;  // resolved configuration, every key, sorted
  nlohmann::json to_json() const;
  void write_resolved(const fs::path& dir) const;  // <dir>/config.toml, atomically

 private:
  const ConfigValue& at(const std::string& key) const;
  std::map<std::string, ConfigValue> values_;
  std::string preset_name_;
};

// Directory holding the preset files: $PGOLF_CONFIG_DIR, else <exe>/../share/pgolf/configs,
// else the source tree's configs/.
fs::path configs_dir();
std::vector<std::string> list_presets();

}  // namespace pgolf
