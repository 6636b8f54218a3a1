// The rendezvous store the core needs: torch's c10d::Store is adapted to this in csrc/torch/.
#pragma once

#include <cstdint>
#include <string>

namespace plait {

class Store {
 public:
  virtual ~Store() = default;
  virtual void set(const std::string& key, const std::string& value) = 0;
  // Blocks until the key exists (up to the store's own timeout), then returns its value.
  virtual std::string get(const std::string& key) = 0;
  virtual int64_t add(const std::string& key, int64_t delta) = 0;
  // Whether the key exists, without waiting.
  virtual bool check(const std::string& key) = 0;
};

}  // namespace plait
