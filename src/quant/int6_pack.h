// s600's int6 bit packing (SPEC 5.8): u = q + 32 (6 bits), four codes in three bytes, LSB first:
// b0 = u0 | u1 << 6, b1 = u1 >> 2 | u2 << 4, b2 = u2 >> 4 | u3 << 2; zero-padded to a multiple of 4 codes.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace pgolf {

// Codes must lie in [-32, 31].
std::vector<uint8_t> pack_int6(std::span<const int8_t> codes);
// Inverse of pack_int6 for `numel` codes; `packed` must hold exactly 3 * ceil(numel / 4) bytes.
std::vector<int8_t> unpack_int6(std::span<const uint8_t> packed, size_t numel);
size_t packed_int6_bytes(size_t numel);

}  // namespace pgolf
