// Minified copies of pgolf's sources for the code archive whose size is the artifact's code bytes
// (README, "Artifact size accounting"). The copies build the same program: only comments and
// whitespace that no token depends on are removed.
//
//   C++ and CUDA (.h .hpp .cpp .cu .cuh): comments removed (a block comment becomes a space, or a
//     line break when it spans lines), leading and trailing blanks of each line removed, runs of
//     blanks between tokens made one space, empty lines dropped. String, character and raw string
//     literals are copied exactly; a ' inside a number (1'000) is a digit separator. Preprocessor
//     lines stay lines; a line continued with a backslash keeps a blank before its continuation.
//   CMake and TOML (.cmake, CMakeLists.txt, .toml): lines whose first non-blank character is # and
//     empty lines dropped, the others kept as they are.
//   Anything else: copied as it is.
// Input the stripper cannot handle safely (an unterminated literal or comment, a line comment
// continued with a backslash) is an error naming the file, not a silent mis-strip.
#pragma once

#include <string>
#include <string_view>

namespace pgolf {

enum class SourceKind { cpp, hash_comments, verbatim };

// The kind of a file from its name (the extension, or CMakeLists.txt).
SourceKind source_kind(std::string_view path);

// Throws std::runtime_error with `name` in the message on input it cannot strip safely.
std::string strip_cpp_source(std::string_view text, std::string_view name);
std::string strip_hash_comment_lines(std::string_view text);
std::string strip_source(std::string_view text, std::string_view path);

}  // namespace pgolf
