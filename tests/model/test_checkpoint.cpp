// Parameters under the reference state-dict names in safetensors: a save/load round trip is bit-exact,
// names and order are the layout's, and a reloaded model computes the same loss bit for bit.
#include <gtest/gtest.h>

#include <cstring>

#include "core/safetensors.h"
#include "test_util.h"
#include "tiny_models.h"

using namespace pgolf;

template <typename T>
void round_trip(const std::string& stack) {
  CpuModel<T> model(test::tiny_config(stack));
  test::perturbed_init(model, 21);
  test::TempDir dir;
  const auto path = dir / "model.safetensors";
  save_safetensors(path, model.params().to_tensors());

  const TensorMap loaded = load_safetensors(path);
  ASSERT_EQ(loaded.size(), model.params().layout().size());
  for (size_t i = 0; i < loaded.size(); ++i) EXPECT_EQ(loaded.names()[i], model.params().layout().spec(i).name);

  CpuModel<T> other(test::tiny_config(stack));
  other.params().load_tensors(loaded, path.string(), /*strict=*/true);
  const auto a = model.params().all(), b = other.params().all();
  ASSERT_EQ(a.size(), b.size());
  EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(T)), 0) << "round trip is not bit-exact";

  model.set_looping(model.config().has_looping());
  other.set_looping(other.config().has_looping());
  const Batch batch = test::tiny_batch(model.config().vocab_size, true);
  const T l1 = model.forward(batch), l2 = other.forward(batch);
  EXPECT_EQ(std::memcmp(&l1, &l2, sizeof(T)), 0) << "reloaded model gives a different loss";
}

TEST(Checkpoint, RoundTripFp32EveryStack) {
  for (const char* s : {"baseline", "s691", "s562", "s600", "s1560"}) round_trip<float>(s);
}

TEST(Checkpoint, RoundTripFp64) { round_trip<double>("s1560"); }

TEST(Checkpoint, MissingOrMisshapenTensorIsAnError) {
  CpuModel<float> model(test::tiny_config("baseline"));
  TensorMap t = model.params().to_tensors();
  t.erase("blocks.1.mlp_scale");
  EXPECT_THROW(model.params().load_tensors(t, "test"), Error);
  TensorMap u = model.params().to_tensors();
  u.set("blocks.1.mlp_scale", HostTensor(DType::F32, {3}));
  EXPECT_THROW(model.params().load_tensors(u, "test"), Error);
}
