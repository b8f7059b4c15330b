// Errors: every failure is an exception that names the file, the value and what was expected.
#pragma once

#include <fmt/format.h>

#include <stdexcept>
#include <string>

namespace pgolf {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

template <typename... Args>
[[noreturn]] void fail(fmt::format_string<Args...> f, Args&&... args) {
  throw Error(fmt::format(f, std::forward<Args>(args)...));
}

}  // namespace pgolf

// PG_CHECK(cond, "format {}", args...): throws pgolf::Error with the formatted message when cond is false.
#define PG_CHECK(cond, ...)                  \
  do {                                       \
    if (!(cond)) ::pgolf::fail(__VA_ARGS__); \
  } while (0)
