#include <gtest/gtest.h>

#include "win_harness.hpp"

int main(int argc, char** argv) {
  if (int status = sockshare::wintest::run_helper_if_requested(argc, argv); status >= 0) {
    return status;
  }
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
