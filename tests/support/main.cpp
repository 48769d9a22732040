#include <gtest/gtest.h>
#include <signal.h>

#include "support/harness.hpp"

int main(int argc, char** argv) {
  // SIGPIPE keeps its default action here: a send without MSG_NOSIGNAL would kill the test (R13).
  if (int status = sockshare::test::run_helper_if_requested(argc, argv); status >= 0) {
    return status;
  }
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
