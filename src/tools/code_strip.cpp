// pgolf_code_strip SOURCE_DIR LIST OUT_DIR: writes the minified copy (core/source_strip.h) of every
// file named in LIST (paths relative to SOURCE_DIR, one per line) under OUT_DIR, with the same
// relative paths and permissions. The build archives OUT_DIR as the code archive.
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <sstream>
#include <string>

#include "core/source_strip.h"

namespace fs = std::filesystem;

namespace {

std::string read_all(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path.string());
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void write_all(const fs::path& path, const std::string& text) {
  fs::create_directories(path.parent_path());
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  out.close();
  if (!out) throw std::runtime_error("cannot write " + path.string());
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: pgolf_code_strip SOURCE_DIR LIST OUT_DIR\n";
    return 2;
  }
  try {
    const fs::path source_dir = argv[1], out_dir = argv[3];
    fs::remove_all(out_dir);
    std::istringstream list(read_all(argv[2]));
    std::string relative;
    int files = 0;
    while (std::getline(list, relative)) {
      if (relative.empty()) continue;
      const fs::path source = source_dir / relative, copy = out_dir / relative;
      write_all(copy, pgolf::strip_source(read_all(source), relative));
      fs::permissions(copy, fs::status(source).permissions());
      ++files;
    }
    if (files == 0) throw std::runtime_error(std::string("no files listed in ") + argv[2]);
  } catch (const std::exception& e) {
    std::cerr << "pgolf_code_strip: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
