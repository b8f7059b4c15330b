#include "quant/int6_pack.h"

#include "core/error.h"

namespace pgolf {

size_t packed_int6_bytes(size_t numel) { return 3 * ((numel + 3) / 4); }

std::vector<uint8_t> pack_int6(std::span<const int8_t> codes) {
  std::vector<uint8_t> out(packed_int6_bytes(codes.size()));
  for (size_t g = 0; g < out.size() / 3; ++g) {
    uint8_t u[4] = {0, 0, 0, 0};  // the padding codes are the byte 0, as the reference pads u
    for (size_t k = 0; k < 4 && 4 * g + k < codes.size(); ++k) {
      const int q = codes[4 * g + k];
      PG_CHECK(q >= -32 && q <= 31, "int6 packing: code {} at index {} is outside [-32, 31]", q, 4 * g + k);
      u[k] = static_cast<uint8_t>(q + 32);
    }
    out[3 * g + 0] = static_cast<uint8_t>(u[0] | (u[1] << 6));
    out[3 * g + 1] = static_cast<uint8_t>((u[1] >> 2) | (u[2] << 4));
    out[3 * g + 2] = static_cast<uint8_t>((u[2] >> 4) | (u[3] << 2));
  }
  return out;
}

std::vector<int8_t> unpack_int6(std::span<const uint8_t> packed, size_t numel) {
  PG_CHECK(packed.size() == packed_int6_bytes(numel), "int6 unpacking: {} bytes for {} codes (expected {})",
           packed.size(), numel, packed_int6_bytes(numel));
  std::vector<int8_t> out(numel);
  for (size_t i = 0; i < numel; ++i) {
    const uint8_t* b = packed.data() + 3 * (i / 4);
    unsigned u = 0;
    switch (i % 4) {
      case 0: u = b[0] & 0x3f; break;
      case 1: u = ((b[0] >> 6) | (b[1] << 2)) & 0x3f; break;
      case 2: u = ((b[1] >> 4) | (b[2] << 4)) & 0x3f; break;
      case 3: u = (b[2] >> 2) & 0x3f; break;
    }
    out[i] = static_cast<int8_t>(static_cast<int>(u) - 32);
  }
  return out;
}

}  // namespace pgolf
