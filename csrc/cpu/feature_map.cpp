// The map registry: names to implementations, and the checks common to every map.
#include "cpu/feature_map.h"

#include <stdexcept>

namespace linattn {

template <class T>
void FeatureMap<T>::check_param_grads(const std::vector<View>& grads,
                                      const std::string& what) const {
  if (!grads.empty()) {
    throw std::invalid_argument(what + ": this feature map has no parameters, but " +
                                std::to_string(grads.size()) + " parameter gradients were given");
  }
}

std::vector<std::string> fused_feature_maps() {
  return {"relu", "elu", "softmax", "identity", "hedgehog"};
}

template <class T>
std::unique_ptr<FeatureMap<T>> make_feature_map(const std::string& name,
                                                const std::vector<View>& params,
                                                std::int64_t heads, std::int64_t head_dim,
                                                const std::string& what) {
  if (name == "hedgehog") return make_hedgehog<T>(params, heads, head_dim, what);
  std::unique_ptr<FeatureMap<T>> map = make_builtin_map<T>(name, head_dim);
  if (!map) {
    std::string known;
    for (const auto& n : fused_feature_maps()) known += (known.empty() ? "" : ", ") + n;
    throw std::invalid_argument(what + ": unknown feature map '" + name + "' (fused: " + known +
                                ")");
  }
  if (!params.empty()) {
    throw std::invalid_argument(what + ": feature map '" + name + "' takes no parameters, got " +
                                std::to_string(params.size()));
  }
  return map;
}

template class FeatureMap<float>;
template class FeatureMap<double>;
template std::unique_ptr<FeatureMap<float>> make_feature_map<float>(
    const std::string&, const std::vector<View>&, std::int64_t, std::int64_t, const std::string&);
template std::unique_ptr<FeatureMap<double>> make_feature_map<double>(
    const std::string&, const std::vector<View>&, std::int64_t, std::int64_t, const std::string&);

}  // namespace linattn
