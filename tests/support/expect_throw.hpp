// Checks that a call fails with the error contract of STYLE.md, so that a check that fires for
// the wrong reason (another argument, another message) does not pass:
//  * EXPECT_THROW_WITH(statement, Exception, "substring"): the statement throws Exception (or a
//    subclass) whose what() contains the substring;
//  * ThrowsInvalidArgumentNaming(call, {"word", ...}): call() throws std::invalid_argument whose
//    what() contains every word (the argument's name, and where given its value).
#pragma once

#include <gtest/gtest.h>

#include <exception>
#include <initializer_list>
#include <stdexcept>
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

namespace switchmoe_test {

template <class Call>
::testing::AssertionResult ThrowsInvalidArgumentNaming(Call&& call,
                                                       std::initializer_list<std::string> words) {
  try {
    call();
  } catch (const std::invalid_argument& e) {
    const std::string message = e.what();
    for (const std::string& word : words) {
      if (message.find(word) == std::string::npos) {
        return ::testing::AssertionFailure() << "std::invalid_argument(\"" << message
                                             << "\") does not contain \"" << word << "\"";
      }
    }
    return ::testing::AssertionSuccess();
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "threw another exception: " << e.what();
  } catch (...) {
    return ::testing::AssertionFailure() << "threw a non-std exception";
  }
  return ::testing::AssertionFailure() << "did not throw";
}

}  // namespace switchmoe_test
