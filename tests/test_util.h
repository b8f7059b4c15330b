// Helpers shared by the tests: where the shared data live, temporary directories, running pgolf.
#pragma once

#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <functional>
#include <string>

namespace pgolf::test {

// $PGOLF_SHARED_DIR when set (a machine where the data live elsewhere), else the build's setting.
inline std::filesystem::path shared_dir() {
  const char* env = std::getenv("PGOLF_SHARED_DIR");
  return env && *env ? std::filesystem::path(env) : std::filesystem::path(PGOLF_SHARED_DIR);
}
inline std::filesystem::path golden_dir() { return shared_dir() / "golden"; }
inline std::filesystem::path data_dir() { return shared_dir() / "data"; }
inline std::filesystem::path sp1024_model() { return data_dir() / "tokenizers" / "fineweb_1024_bpe.model"; }
inline std::filesystem::path val_prefix_shard() {
  return data_dir() / "fineweb_val_prefix" / "fineweb_val_prefix_000000.bin";
}

// The message of the exception (a pgolf::Error, usually) that `fn` throws; "(no error)" when it returns.
inline std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "(no error)";
}

// A fresh directory under the system temp dir, removed when the object goes out of scope.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "pgolf-test-XXXXXX").string();
    char* p = ::mkdtemp(tmpl.data());
    if (!p) throw std::runtime_error("mkdtemp failed");
    path_ = p;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path operator/(const std::string& s) const { return path_ / s; }

 private:
  std::filesystem::path path_;
};

struct CommandResult {
  int status = -1;
  std::string output;  // stdout and stderr together
};

// Runs the pgolf binary built with the tests, with the given argument string.
inline CommandResult run_pgolf(const std::string& args) {
  std::string cmd = std::string(PGOLF_BINARY) + " " + args + " 2>&1";
  CommandResult r;
  FILE* f = ::popen(cmd.c_str(), "r");
  if (!f) return r;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), f)) > 0) r.output.append(buf, n);
  int st = ::pclose(f);
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return r;
}

}  // namespace pgolf::test
