#include "core/config.h"

#include <unistd.h>

#include <nlohmann/json.hpp>
#include <toml++/toml.h>

#include <cmath>
#include <set>
#include <sstream>

#include "core/error.h"

namespace pgolf {

namespace {

const char* type_name(const ConfigValue& v) {
  switch (v.index()) {
    case 0: return "bool";
    case 1: return "integer";
    case 2: return "float";
    case 3: return "string";
    case 4: return "integer list";
    case 5: return "float list";
    case 6: return "string list";
  }
  return "?";
}

ConfigValue from_node(const toml::node& n, const std::string& key, const std::string& what) {
  if (auto b = n.as_boolean()) return b->get();
  if (auto i = n.as_integer()) return static_cast<int64_t>(i->get());
  if (auto f = n.as_floating_point()) return f->get();
  if (auto s = n.as_string()) return s->get();
  if (auto a = n.as_array()) {
    PG_CHECK(!a->empty(), "{}: key '{}' is an empty array; its element type cannot be known", what, key);
    if (a->is_homogeneous(toml::node_type::integer)) {
      std::vector<int64_t> v;
      for (auto& e : *a) v.push_back(e.as_integer()->get());
      return v;
    }
    if (a->is_homogeneous(toml::node_type::string)) {
      std::vector<std::string> v;
      for (auto& e : *a) v.push_back(e.as_string()->get());
      return v;
    }
    std::vector<double> v;
    for (auto& e : *a) {
      if (auto i = e.as_integer()) v.push_back(static_cast<double>(i->get()));
      else if (auto f = e.as_floating_point()) v.push_back(f->get());
      else fail("{}: key '{}' mixes numbers with other types", what, key);
    }
    return v;
  }
  fail("{}: key '{}' has an unsupported TOML type (tables and dates are not used in presets)", what, key);
}

// Converts `v` to the type of `like` where the conversion loses nothing (int -> float, int list ->
// float list); throws otherwise.
ConfigValue coerce(const ConfigValue& like, ConfigValue v, const std::string& key) {
  if (like.index() == v.index()) return v;
  if (std::holds_alternative<double>(like) && std::holds_alternative<int64_t>(v))
    return static_cast<double>(std::get<int64_t>(v));
  if (std::holds_alternative<std::vector<double>>(like) && std::holds_alternative<std::vector<int64_t>>(v)) {
    std::vector<double> d;
    for (auto x : std::get<std::vector<int64_t>>(v)) d.push_back(static_cast<double>(x));
    return d;
  }
  if (std::holds_alternative<std::vector<int64_t>>(like) && std::holds_alternative<int64_t>(v))
    return std::vector<int64_t>{std::get<int64_t>(v)};
  if (std::holds_alternative<std::vector<double>>(like) && std::holds_alternative<double>(v))
    return std::vector<double>{std::get<double>(v)};
  fail("config key '{}' expects a {} value, got a {}", key, type_name(like), type_name(v));
}

fs::path exe_dir() {
  char buf[4096];
  ssize_t n = ::readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n <= 0) return {};
  buf[n] = 0;
  return fs::path(buf).parent_path();
}

Config load_recursive(const fs::path& file, std::set<fs::path>& seen);

Config parse_with_parent(const toml::table& tbl, const std::string& what, std::set<fs::path>& seen,
                         bool is_defaults) {
  Config cfg;
  if (!is_defaults) {
    std::string parent = "defaults";
    if (auto inh = tbl["inherit"].value<std::string>()) parent = *inh;
    fs::path pf = configs_dir() / (parent + ".toml");
    PG_CHECK(fs::exists(pf), "{}: inherits from preset '{}', but {} does not exist", what, parent, pf.string());
    cfg = load_recursive(pf, seen);
  }
  for (auto& [k, node] : tbl) {
    std::string key(k.str());
    if (key == "inherit") continue;
    ConfigValue v = from_node(node, key, what);
    if (is_defaults) cfg.set_declared_for_defaults(key, v);
    else cfg.set(key, v);
  }
  return cfg;
}

Config load_recursive(const fs::path& file, std::set<fs::path>& seen) {
  fs::path canon = fs::weakly_canonical(file);
  PG_CHECK(!seen.count(canon), "preset inheritance loops through {}", file.string());
  seen.insert(canon);
  toml::table tbl;
  try {
    tbl = toml::parse_file(file.string());
  } catch (const toml::parse_error& e) {
    fail("{}: {} (line {})", file.string(), e.description(), e.source().begin.line);
  }
  bool is_defaults = file.filename() == "defaults.toml";
  return parse_with_parent(tbl, file.string(), seen, is_defaults);
}

std::string value_to_toml(const ConfigValue& v) {
  std::ostringstream os;
  auto num = [](double d) {
    if (std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 1e15) return fmt::format("{:.1f}", d);
    return fmt::format("{}", d);
  };
  auto quote = [](const std::string& s) {
    std::string q = "\"";
    for (char c : s) {
      if (c == '"' || c == '\\') q += '\\';
      q += c;
    }
    return q + "\"";
  };
  std::visit(
      [&](auto&& x) {
        using T = std::decay_t<decltype(x)>;
        if constexpr (std::is_same_v<T, bool>) os << (x ? "true" : "false");
        else if constexpr (std::is_same_v<T, int64_t>) os << x;
        else if constexpr (std::is_same_v<T, double>) os << num(x);
        else if constexpr (std::is_same_v<T, std::string>) os << quote(x);
        else {
          os << "[";
          for (size_t i = 0; i < x.size(); ++i) {
            if (i) os << ", ";
            using E = std::decay_t<decltype(x[i])>;
            if constexpr (std::is_same_v<E, double>) os << num(x[i]);
            else if constexpr (std::is_same_v<E, std::string>) os << quote(x[i]);
            else os << x[i];
          }
          os << "]";
        }
      },
      v);
  return os.str();
}

}  // namespace

fs::path configs_dir() {
  if (const char* env = std::getenv("PGOLF_CONFIG_DIR")) return env;
  fs::path installed = exe_dir() / ".." / "share" / "pgolf" / "configs";
  if (fs::exists(installed / "defaults.toml")) return installed;
#ifdef PGOLF_SOURCE_DIR
  return fs::path(PGOLF_SOURCE_DIR) / "configs";
#else
  fail("cannot find the preset directory: set PGOLF_CONFIG_DIR");
#endif
}

std::vector<std::string> list_presets() {
  std::vector<std::string> out;
  for (auto& p : glob_sorted((configs_dir() / "*.toml").string())) {
    std::string s = p.stem().string();
    if (s != "defaults") out.push_back(s);
  }
  return out;
}

Config Config::load(const std::string& preset) {
  fs::path file = preset;
  if (file.extension() != ".toml") file = configs_dir() / (preset + ".toml");
  if (!fs::exists(file)) {
    std::string known;
    for (auto& p : list_presets()) known += " " + p;
    fail("unknown preset '{}' ({} not found); presets:{}", preset, file.string(), known);
  }
  std::set<fs::path> seen;
  Config c = load_recursive(file, seen);
  c.preset_name_ = file.stem().string();
  return c;
}

Config Config::from_toml(const std::string& text, const std::string& what) {
  toml::table tbl;
  try {
    tbl = toml::parse(text, what);
  } catch (const toml::parse_error& e) {
    fail("{}: {} (line {})", what, e.description(), e.source().begin.line);
  }
  std::set<fs::path> seen;
  Config c = parse_with_parent(tbl, what, seen, false);
  c.preset_name_ = tbl["inherit"].value_or(std::string("defaults"));
  return c;
}

void Config::set_declared_for_defaults(const std::string& key, ConfigValue v) { values_[key] = std::move(v); }

void Config::set(const std::string& key, ConfigValue v) {
  auto it = values_.find(key);
  if (it == values_.end()) {
    std::string near;
    for (auto& [k, _] : values_)
      if (k.find(key.substr(0, std::min<size_t>(4, key.size()))) != std::string::npos) near += " " + k;
    fail("unknown config key '{}'{}", key, near.empty() ? std::string() : " (similar keys:" + near + ")");
  }
  it->second = coerce(it->second, std::move(v), key);
}

void Config::set_from_string(const std::string& assignment) {
  auto eq = assignment.find('=');
  PG_CHECK(eq != std::string::npos && eq > 0, "expected key=value, got '{}'", assignment);
  std::string key = assignment.substr(0, eq);
  std::string lit = assignment.substr(eq + 1);
  ConfigValue v;
  try {
    toml::table t = toml::parse("v = " + lit);
    v = from_node(*t.get("v"), key, "--set");
  } catch (const toml::parse_error&) {
    v = lit;  // a bare word: a string
  }
  // A string key given something that parsed as another type ("--set compressor=1") stays a string.
  auto it = values_.find(key);
  if (it != values_.end() && std::holds_alternative<std::string>(it->second) && !std::holds_alternative<std::string>(v))
    v = lit;
  set(key, std::move(v));
}

const ConfigValue& Config::at(const std::string& key) const {
  auto it = values_.find(key);
  PG_CHECK(it != values_.end(), "config key '{}' is not declared in configs/defaults.toml", key);
  return it->second;
}

bool Config::get_bool(const std::string& key) const {
  auto& v = at(key);
  PG_CHECK(std::holds_alternative<bool>(v), "config key '{}' is a {}, not a bool", key, type_name(v));
  return std::get<bool>(v);
}
int64_t Config::get_int(const std::string& key) const {
  auto& v = at(key);
  PG_CHECK(std::holds_alternative<int64_t>(v), "config key '{}' is a {}, not an integer", key, type_name(v));
  return std::get<int64_t>(v);
}
double Config::get_double(const std::string& key) const {
  auto& v = at(key);
  if (std::holds_alternative<int64_t>(v)) return static_cast<double>(std::get<int64_t>(v));
  PG_CHECK(std::holds_alternative<double>(v), "config key '{}' is a {}, not a number", key, type_name(v));
  return std::get<double>(v);
}
std::string Config::get_string(const std::string& key) const {
  auto& v = at(key);
  PG_CHECK(std::holds_alternative<std::string>(v), "config key '{}' is a {}, not a string", key, type_name(v));
  return std::get<std::string>(v);
}
std::vector<int64_t> Config::get_int_list(const std::string& key) const {
  auto& v = at(key);
  PG_CHECK(std::holds_alternative<std::vector<int64_t>>(v), "config key '{}' is a {}, not an integer list", key,
           type_name(v));
  return std::get<std::vector<int64_t>>(v);
}
std::vector<double> Config::get_double_list(const std::string& key) const {
  auto& v = at(key);
  if (std::holds_alternative<std::vector<int64_t>>(v)) {
    std::vector<double> d;
    for (auto x : std::get<std::vector<int64_t>>(v)) d.push_back(static_cast<double>(x));
    return d;
  }
  PG_CHECK(std::holds_alternative<std::vector<double>>(v), "config key '{}' is a {}, not a float list", key,
           type_name(v));
  return std::get<std::vector<double>>(v);
}
std::vector<std::string> Config::get_string_list(const std::string& key) const {
  auto& v = at(key);
  PG_CHECK(std::holds_alternative<std::vector<std::string>>(v), "config key '{}' is a {}, not a string list", key,
           type_name(v));
  return std::get<std::vector<std::string>>(v);
}

std::string Config::to_toml() const {
  std::string out = "# resolved pgolf configuration (preset " + preset_name_ + ")\n";
  for (auto& [k, v] : values_) out += k + " = " + value_to_toml(v) + "\n";
  return out;
}

nlohmann::json Config::to_json() const {
  nlohmann::json j = nlohmann::json::object();
  for (auto& [k, v] : values_) std::visit([&](auto&& x) { j[k] = x; }, v);
  return j;
}

void Config::write_resolved(const fs::path& dir) const { write_text_file_atomic(dir / "config.toml", to_toml()); }

}  // namespace pgolf
