// EXPECT_THROW_WITH(statement, Exception, "substring"): the statement throws Exception (or a
// subclass) whose what() contains the substring. Bad-input tests use it so that a check that
// fires for the wrong reason (another argument, another message) does not pass.
#pragma once

#include <gtest/gtest.h>

#include <string>

#define EXPECT_THROW_WITH(statement, exception_type, substring)                                \
  do {                                                                                         \
    bool switchmoe_thrown = false;                                                             \
    try {                                                                                      \
      statement;                                                                               \
    } catch (const exception_type& switchmoe_error) {                                          \
      switchmoe_thrown = true;                                                                 \
      EXPECT_NE(std::string(switchmoe_error.what()).find(substring), std::string::npos)        \
          << "message \"" << switchmoe_error.what() << "\" does not contain \"" << (substring) \
          << "\"";                                                                             \
    } catch (const std::exception& switchmoe_other) {                                          \
      ADD_FAILURE() << #statement " threw another exception: " << switchmoe_other.what();      \
      switchmoe_thrown = true;                                                                 \
    }                                                                                          \
    if (!switchmoe_thrown) ADD_FAILURE() << #statement " did not throw " #exception_type;      \
  } while (0)
